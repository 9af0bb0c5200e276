"""What the benchmarks share: peak memory, the matmul peak, child processes watched for memory,
a clock around TRL's SFTTrainer that counts like our recipe's, and a text tokenizer as wide as a
real LM's. Imported by the scripts next to it (``python benchmarks/<name>.py`` puts this folder on
``sys.path``)."""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULT = "RESULT "  # prefix of the one JSON line a worker prints


def peak_memory_gb() -> float:
    """This process's peak: max allocated on a GPU, else the maximum resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5, wall: bool = False,
                device: str = "cpu") -> float:
    """Best FLOP per second of an n^3 matmul: per CPU-second by default (on a busy machine
    wall-clock would understate the peak and overstate the utilisation), per wall-second with
    ``wall`` (what a run on an idle machine with this many threads can reach; always on a GPU)."""
    def clock() -> float:
        if device != "cpu":
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.perf_counter() if wall else time.process_time()

    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        a @ b
        best = min(best, clock() - start)
    return 2 * n**3 / best


def bench_env(threads: int | None = None) -> dict[str, str]:
    """Environment of a benchmark child: the repo importable, offline, one DeepSpeed op cache
    per user (as the tests use), ``threads`` OpenMP threads. The repo goes before any PYTHONPATH
    already set (packages a GPU machine carries there)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get(
               "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "unimodal" / "torch_extensions"))}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), and the GPU when there is one: for a table's header."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    return f"{cpu} + {torch.cuda.get_device_name()}" if torch.cuda.is_available() else cpu


def memory_available_gb() -> float:
    """MemAvailable of this machine (what a new process can take without swapping or the OOM killer)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no MemAvailable in /proc/meminfo")


@dataclass
class ChildRun:
    """What a watched child process left: its ``RESULT`` lines, the peak resident memory of its
    whole process tree (sampled), and why it stopped when it did not finish."""

    results: list[dict] = field(default_factory=list)
    tree_peak_gb: float = 0.0
    seconds: float = 0.0
    error: str | None = None  # "did not fit in N GB ..." / "failed (exit 1): <last lines>" / None
    log: str = ""


def run_child(cmd: list[str], env: dict, limit_gb: float, timeout_s: float, poll_s: float = 0.25) -> ChildRun:
    """Run ``cmd``, sampling the memory (`_proportional_set`) of it and all its descendants
    (``accelerate launch`` workers included). Over ``limit_gb`` the tree is killed and reported as
    "did not fit", so one variant that needs more memory than the machine has ends as a table row
    instead of waking the OOM killer (which may pick another process of the machine)."""
    import psutil

    start = time.perf_counter()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-child-{os.getpid()}-{time.time_ns()}.log"
    run = ChildRun()
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                used = sum(_proportional_set(p) for p in [root, *root.children(recursive=True)]) / 2**30
            except psutil.Error:  # a process ended between listing and reading
                used = 0.0
            run.tree_peak_gb = max(run.tree_peak_gb, used)
            over, late = used > limit_gb, time.perf_counter() - start > timeout_s
            if over or late:
                _kill_tree(root)
                run.error = (f"did not fit in {limit_gb:.1f} GB (killed at {used:.1f} GB)" if over
                             else f"timed out after {timeout_s:.0f} s")
                break
            time.sleep(poll_s)
        proc.wait()
        log.seek(0)
        run.log = log.read()
    log_path.unlink()
    run.seconds = time.perf_counter() - start
    run.results = [json.loads(line[len(RESULT):]) for line in run.log.splitlines() if line.startswith(RESULT)]
    if run.error is None and proc.returncode != 0:
        lines = [line.strip() for line in run.log.splitlines() if line.strip()]
        # the exception line of the (last) traceback says most; else the last line
        errors = [line for line in lines if re.match(r"^(\[rank\d+\]: )?[\w.]+(Error|Exception)\b", line)]
        run.error = f"failed (exit {proc.returncode}): " + (errors or lines or ["no output"])[-1][:300]
    return run


def _proportional_set(process) -> int:
    """Bytes of a process's resident set, pages shared with other processes divided among them
    (Linux's PSS; elsewhere the resident set). A plain sum of resident sets counts a worker twice
    while a fork of it lives: twice in the 0.5B ZeRO-3 rows, a 16 GB tree read as 24.4 GB for a
    moment and killed."""
    try:
        with open(f"/proc/{process.pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return process.memory_info().rss


def _kill_tree(root) -> None:
    """SIGKILL a child and its descendants (torchrun starts workers in sessions of their own)."""
    import psutil

    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def time_trainer(trainer) -> dict:
    """``trainer.train()`` of a transformers/TRL ``Trainer``, timed like our recipe's `Throughput`:
    non-pad tokens of the training steps after the first one (warm-up), wall and CPU seconds,
    padding share, peak memory."""
    from transformers import TrainerCallback

    counts = {"tokens": 0, "positions": 0}
    collate = trainer.data_collator

    def counting_collator(examples):
        out = collate(examples)
        ids = out["input_ids"]
        real = out["attention_mask"].sum() if "attention_mask" in out else ids.numel()  # padding-free: all real
        counts["tokens"] += int(real)
        counts["positions"] += ids.numel()
        return out

    trainer.data_collator = counting_collator
    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:  # like ours: the first step is warm-up
                marks["start"], marks["counts"] = (time.perf_counter(), time.process_time()), dict(counts)
            marks["end"], marks["end_counts"] = (time.perf_counter(), time.process_time()), dict(counts)

    trainer.add_callback(Clock())
    trainer.train()
    tokens = marks["end_counts"]["tokens"] - marks["counts"]["tokens"]
    positions = marks["end_counts"]["positions"] - marks["counts"]["positions"]
    seconds, cpu_seconds = (end - start for end, start in zip(marks["end"], marks["start"]))
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "tokens_per_s": tokens / seconds if seconds else 0.0,
            "padding_fraction": 1 - tokens / positions if positions else 0.0, "peak_gb": peak_memory_gb()}


def wide_text_tokenizer(rows: int):
    """`unimodal.offline.train_text_tokenizer` with its BPE vocabulary padded to ``rows`` entries
    (unused ``<|unused_i|>`` strings no merge produces), so a random LM gets a real LM's text rows
    (Qwen2.5: 151,936) and the tokenizer still loads in a fraction of a second. (Filling them as
    added tokens instead, which is what `add_image_tokens` does for a padded vocabulary, makes
    every load take ~15 s at 150k rows.)"""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from unimodal.offline import train_text_tokenizer

    small = train_text_tokenizer()
    spec = json.loads(small.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    first = len(small)
    if rows < first:
        raise ValueError(f"rows={rows} is below the {first} tokens the tokenizer already has")
    vocab.update({f"<|unused_{i}|>": first + i for i in range(rows - first)})
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=small.bos_token,
                                   eos_token=small.eos_token, pad_token=small.pad_token)


def base_generation_parser(doc: str, full: str, full_model: str, full_layers: int) -> argparse.ArgumentParser:
    """The options of the unified-base generation benchmarks (base_emu3.py, base_janus.py):
    ``--configs`` tiny / ``full`` (a full-size-shaped config, named ``full`` after ``full_model``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny"], choices=["tiny", full])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tiny_side", type=int, default=16, help="tiny config: grid side (16 -> 256 codes)")
    parser.add_argument("--layers", type=int, default=2, help=f"{full} config: layers ({full_model}: {full_layers})")
    parser.add_argument("--tokens", type=int, default=64, help=f"{full} config: about this many codes per image")
    parser.add_argument("--dtype", default="bfloat16", help=f"{full} config: model dtype")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def best_of(fn, repeats: int) -> tuple[float, torch.Tensor]:
    """(best wall seconds, result) of ``fn(seed=r)`` over ``repeats`` runs with seeds 0, 1, ..."""
    best, out = float("inf"), None
    for r in range(repeats):
        start = time.perf_counter()
        out = fn(seed=r)
        best = min(best, time.perf_counter() - start)
    assert out is not None
    return best, out
