"""Fine-tuning throughput: recipes/finetune.py against TRL's SFTTrainer, same model, data, machine.

Data: captioned scikit-learn digits at 16 px through a 64-colour PixelTokenizer (256 image tokens
per image), text-to-image + image-to-text samples of ~262 tokens. Model: a Llama built from a
config (hidden 256, 4 layers), identical initial weights for every run. Each run is a separate
process (clean peak memory), fp32 and bf16 autocast, both systems with padded (length-grouped /
TRL's default) and packed batches of the same tokens per step. Reported:

- trained tokens per CPU-second (the process's CPU time: steady on a shared machine) and per
  wall-second: non-pad tokens of training steps, the first step excluded;
- peak memory: the process's maximum resident set (CPU) / max allocated (GPU);
- padding waste: pad positions / all positions of the batches that were trained;
- achieved model FLOP (6 x matmul parameters + causal attention, per token) per CPU-second as a
  fraction of the bf16 (and fp32) matmul peak measured the same way (a 2048^3 matmul).

    python benchmarks/finetune.py --threads 1     # ~25 min on a busy 2-core VM
    python benchmarks/finetune.py --steps 3 --repeats 1    # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import runpy
import subprocess
import sys
from pathlib import Path

import torch
from common import bench_env, matmul_peak, peak_memory_gb, time_trainer

from unimodal.data import PROCESSOR_SUBFOLDER

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ["ours_padded", "trl_padded", "ours_packed", "trl_packed"]
NAMES = {"ours_padded": "recipes/finetune.py, padded (length-grouped)", "trl_padded": "TRL SFTTrainer, padded",
         "ours_packed": "recipes/finetune.py, packed", "trl_packed": "TRL SFTTrainer, packing=True (BFD)"}
MODEL = dict(model_type="llama", hidden_size=256, num_layers=4, num_heads=4)  # the recipe's `build:` section
ROWS, MAX_LENGTH, LR, WARMUP = 2, 1024, 1e-3, 5  # ours: 2 packed rows of <= 1024 tokens per step


def prepare(root: Path) -> None:
    """Text tokenizer + pre-tokenised digits in ``root`` (once)."""
    from unimodal import PixelTokenizer, PixelTokenizerConfig, add_image_tokens
    from unimodal.data import PretokenizeOptions, pretokenize, save_pretokenized
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))  # the demo's data set
    from digits import load_digits_dataset

    from unimodal.offline import build_causal_lm, train_text_tokenizer

    if (root / "data" / "unimodal_data.json").exists():
        return
    tokenizer = train_text_tokenizer()
    tokenizer.save_pretrained(root / "text_tokenizer")
    pixels = PixelTokenizer(PixelTokenizerConfig(codebook_size=64, image_size=16))
    processor = add_image_tokens(build_causal_lm("llama", vocab_size=len(tokenizer)), copy.deepcopy(tokenizer), pixels)
    options = PretokenizeOptions(tasks=("t2i", "i2t"))
    result = pretokenize(load_digits_dataset(image_size=16, split="train"), processor, options,
                         cache_dir=root / "cache")
    save_pretokenized(result, root / "data", processor, options)


def samples_per_step(root: Path) -> int:
    """Padded batches hold as many samples as ROWS packed rows: the same tokens per step."""
    import datasets

    lengths = datasets.load_from_disk(str(root / "data"))["length"]
    return max(1, round(ROWS * MAX_LENGTH / (sum(lengths) / len(lengths))))


def run_ours(root: Path, precision: str, steps: int, packing: bool) -> dict:
    out = root / f"ours-{precision}-{packing}"
    argv = ["--dataset_path", str(root / "data"), "--tokenizer_name_or_path", str(root / "text_tokenizer"),
            *[x for k, v in MODEL.items() for x in (f"--build.{k}", str(v))], "--tasks", "t2i", "i2t",
            "--max_length", str(MAX_LENGTH), "--packing", str(packing).lower(),
            "--per_device_batch_size", str(ROWS if packing else samples_per_step(root)), "--max_steps", str(steps),
            "--learning_rate", str(LR), "--warmup_steps", str(WARMUP), "--mixed_precision", precision,
            "--save_steps", str(10**9), "--log_steps", str(10**9), "--report_to", "none", "--eval_size", "16",
            "--output_dir", str(out)]
    sys.argv = ["finetune.py", *argv]
    runpy.run_path(str(REPO / "recipes" / "finetune.py"), run_name="__main__")
    stats = json.loads((out / "train_stats.json").read_text())
    return {**stats, "peak_gb": peak_memory_gb()}


def run_trl(root: Path, precision: str, steps: int, packing: bool) -> dict:
    from trl import SFTConfig, SFTTrainer

    from unimodal.finetune import DataArguments, ModelArguments, load_model_and_processor, load_task_data
    from unimodal.processor import UnimodalProcessor

    data_processor = UnimodalProcessor.from_pretrained(root / "data" / PROCESSOR_SUBFOLDER)
    model, processor = load_model_and_processor(
        ModelArguments(tokenizer_name_or_path=str(root / "text_tokenizer"), build=MODEL), data_processor)
    train, _ = load_task_data(DataArguments(dataset_path=str(root / "data"), tasks=["t2i", "i2t"], eval_size=16),
                              processor)
    train = train.select_columns(["input_ids"])  # pre-tokenised: TRL skips its own tokenisation
    batch = ROWS if packing else samples_per_step(root)
    config = SFTConfig(
        output_dir=str(root / "trl"), max_steps=steps, per_device_train_batch_size=batch, max_length=MAX_LENGTH,
        packing=packing, learning_rate=LR, warmup_steps=WARMUP, lr_scheduler_type="cosine", weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", bf16=precision == "bf16", use_cpu=not torch.cuda.is_available(),
        report_to=[], save_strategy="no", logging_steps=10**9, dataloader_num_workers=0, seed=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=processor.tokenizer)
    return time_trainer(trainer)


def flops_per_token(root: Path) -> float:
    """6 x matmul parameters (all linear layers incl. the LM head, not the embedding lookup) +
    causal attention (6 x layers x hidden x mean sample length: QK^T and AV, forward + backward,
    each token attending to half its sample on average)."""
    import datasets

    from unimodal.offline import build_causal_lm

    model = build_causal_lm(vocab_size=1024, **MODEL)
    config = root / "data" / PROCESSOR_SUBFOLDER / "processor_config.json"
    vocab = json.loads(config.read_text())["image_token_range"][1]
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    linear += (vocab - 1024) * MODEL["hidden_size"]  # the head at the real vocabulary size
    lengths = datasets.load_from_disk(str(root / "data"))["length"]
    attention = 6 * MODEL["num_layers"] * MODEL["hidden_size"] * (sum(lengths) / len(lengths))
    return 6 * linear + attention


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    packing = args.worker.endswith("_packed")
    if args.worker.startswith("ours"):
        result = run_ours(root, args.precision, args.steps, packing)
    else:
        result = run_trl(root, args.precision, args.steps, packing)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--root", default=str(REPO / "outputs" / "bench_finetune"))
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch threads per run (1 on a machine shared with other jobs: OpenMP threads "
                             "spin-waiting on oversubscribed cores slow both systems down by an order of magnitude)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per system; best kept")
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"], choices=["no", "bf16"],
                        help="mixed_precision values to run (bf16 only on a GPU: benchmarks/gpu.sh)")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    prepare(root)
    env = bench_env()
    results: dict[tuple[str, str], dict] = {}
    for precision in args.precisions:
        for _ in range(args.repeats):  # alternate: every system sees the same machine load
            for system in SYSTEMS:
                cmd = [sys.executable, __file__, "--worker", system, "--precision", precision, "--root", str(root),
                       "--steps", str(args.steps), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise RuntimeError(f"{system} {precision} failed:\n{proc.stderr[-4000:]}")
                got = json.loads(line[7:])
                got["per_cpu_s"] = got["tokens"] / got["cpu_seconds"]
                print(f"{system} {precision}: {got['per_cpu_s']:.0f} tokens/CPU-s, {got['tokens_per_s']:.0f} "
                      f"tokens/s, peak {got['peak_gb']:.2f} GB", flush=True)
                best = results.get((system, precision))
                if best is None or got["per_cpu_s"] > best["per_cpu_s"]:
                    results[(system, precision)] = got
    torch.set_num_threads(args.threads)
    peak = matmul_peak(torch.bfloat16)
    per_token = flops_per_token(root)
    fp32_peak = matmul_peak(torch.float32)
    print(f"\n{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
          f"matmul peak per CPU-s: bf16 {peak / 1e9:.0f} GFLOP, fp32 {fp32_peak / 1e9:.0f} GFLOP; "
          f"{per_token / 1e6:.1f} MFLOP per token; {args.steps} steps, best of {args.repeats}\n")
    print("| system | precision | tokens per CPU-s | vs TRL, same batching | tokens/s (wall) | peak memory | "
          "padding | model FLOP / bf16 peak | / fp32 peak |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for precision in args.precisions:
        for system in SYSTEMS:
            r = results[(system, precision)]
            trl = results[("trl_" + system.split("_")[1], precision)]
            achieved = r["per_cpu_s"] * per_token  # model FLOP per CPU-second, like the peaks
            print(f"| {NAMES[system]} | {'fp32' if precision == 'no' else 'bf16'} | {r['per_cpu_s']:.0f} | "
                  f"{r['per_cpu_s'] / trl['per_cpu_s']:.2f}x | {r['tokens_per_s']:.0f} | {r['peak_gb']:.2f} GB | "
                  f"{r['padding_fraction']:.1%} | {achieved / peak:.1%} | {achieved / fp32_peak:.1%} |")


if __name__ == "__main__":
    main()
