"""Launching the fine-tune recipe for real, shared by the launch tests (test_finetune_launch,
test_fsdp, test_faults*): the recipe command, its environment, waiting for a file, killing a launch
with its workers."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
LAUNCH_CONFIGS = REPO / "recipes" / "configs" / "accelerate"
STEPS = 30  # long enough after the first checkpoint (step 3) for the kill test to land mid-run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    # DeepSpeed builds its CPU comm op once with ninja (minutes); cache it per user, not per clone,
    # so fresh clones (CI) on the same machine reuse it.
    # One thread per process (accelerate launch does the same): on a busy machine, OpenMP threads
    # spin-waiting for a core made a tiny one-process run 25x slower.
    # The repo first, then any PYTHONPATH already set (packages a GPU machine carries there).
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "TORCH_EXTENSIONS_DIR": os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "unimodal" / "torch_extensions")),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


# The two ways to name the recipe: the clone's script and the installed package's module.
ENTRY_POINTS = {"script": [str(REPO / "recipes" / "finetune.py")], "module": ["-m", "unimodal.recipes.finetune"]}


def command(launch: str | None, data_root: Path, out: Path, *extra: str, entry: str = "script") -> list[str]:
    args = ["--dataset_path", str(data_root / "data"), "--tokenizer_name_or_path", str(data_root / "text_tokenizer"),
            "--build.hidden_size", "32", "--tasks", "t2i", "i2t", "--eval_size", "8", "--max_length", "160",
            "--per_device_batch_size", "4", "--max_steps", str(STEPS), "--save_steps", "3", "--eval_steps", "15",
            "--log_steps", "5", "--learning_rate", "3e-3", "--warmup_steps", "3", "--mixed_precision", "no",
            # below the initial gradient norm (~1.5) and not accelerate's DeepSpeed default (1.0), so
            # DDP/DeepSpeed parity also checks that DeepSpeed clips at the recipe's value
            "--max_grad_norm", "0.5",
            "--report_to", "none", "--output_dir", str(out), *extra]
    if launch is None:
        return [sys.executable, *ENTRY_POINTS[entry], *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH_CONFIGS / launch),
            "--main_process_port", str(free_port()), *ENTRY_POINTS[entry], *args]


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def kill_tree(pid: int) -> None:
    """SIGKILL the launcher and its workers: torchrun starts them in their own sessions, so
    killing the launcher's process group alone would leave them training."""
    parent = psutil.Process(pid)
    procs = [parent, *parent.children(recursive=True)]
    for p in procs:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300, poll: float = 0.02) -> None:
    """Wait until ``path`` exists (a checkpoint, a marker file) while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(poll)
    assert path.exists(), f"{path} never appeared (exit code {proc.poll()})"
