"""The LM side of a large image codebook: every image code is one more row of the LM's embedding
and head, so 64k codes cost more per fine-tuning step than 16k. This runs the finetune recipe
(chunked loss, full fine-tune, gradient checkpointing, t2i samples) on `benchmarks/scale.py`'s
Qwen2.5 shapes with ``--codes`` image tokens and reports trained tokens/s and peak memory.

    python benchmarks/tokenizer_lm.py --codes 16384 65536            # Qwen2.5-0.5B shape, 24 layers
    python benchmarks/tokenizer_lm.py --codes 16384 65536 --layers 4 # fewer layers: the head's share grows
    python benchmarks/tokenizer_lm.py --codes 16384 65536 --quick    # tiny shape: a smoke run (seconds)

Each size runs in a fresh process, one after the other, so each peak memory is its own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch


def lm_row(codes: int, args) -> dict:
    """Fine-tuning cost of a large image vocabulary: the finetune recipe (chunked loss, full
    fine-tune, gradient checkpointing, t2i) on `benchmarks/scale.py`'s Qwen2.5 shape (``--lm``;
    ``--quick``: its tiny shape) extended with ``codes`` image tokens instead of 8192. Runs in its
    own process, so its peak resident memory is its own."""
    import shutil
    from types import SimpleNamespace

    import scale
    from common import peak_memory_gb

    from unimodal.recipes.finetune import main as finetune

    base = scale.QUICK if args.quick else scale.LMS[args.lm]
    shape = replace(base, codes=codes, layers=args.layers or base.layers)
    root = Path(args.root) / f"{'quick' if args.quick else args.lm}-{shape.layers}l-codes{codes}"
    scale.prepare(root, shape, with_lm=True)
    out = root / "run"
    shutil.rmtree(out, ignore_errors=True)  # the recipe would resume a finished run
    opts = SimpleNamespace(root=str(root), steps=args.steps, precision="no")  # what recipe_argv reads
    finetune(scale.recipe_argv(opts, shape, out, "t2i", "ours", lora=False, gc=True, batch=args.batch))
    stats = json.loads((out / "train_stats.json").read_text())
    return {"codes": codes, "rows": shape.text_rows + codes, "layers": shape.layers, **stats,
            "peak_gb": peak_memory_gb()}


def lm_table(rows: list[dict]) -> str:
    first = rows[0]
    lines = ["| image codes | vocabulary rows | layers | trained tokens/s (× first) | peak memory GB (× first) |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['codes']} | {r['rows']} | {r['layers']} | {r['tokens_per_s']:.1f} "
                     f"({r['tokens_per_s'] / first['tokens_per_s']:.2f}) | {r['peak_gb']:.2f} "
                     f"({r['peak_gb'] / first['peak_gb']:.2f}) |")
    return "\n".join(lines)


def run(args) -> list[dict]:
    """One fresh process per vocabulary size, one after the other (peak memory and speed alone)."""
    rows = []
    for codes in args.codes:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
            rows.append(pool.submit(lm_row, codes, args).result())
        print(f"{codes} codes: {rows[-1]['tokens_per_s']:.1f} tokens/s, {rows[-1]['peak_gb']:.2f} GB", flush=True)
    shape = "tiny" if args.quick else f"Qwen2.5-{args.lm}"
    print(f"\nfinetune recipe, {shape} shape, full fine-tune + gradient checkpointing, chunked loss, t2i, batch "
          f"{args.batch}, {args.steps} steps (the first is warm-up); {datetime.date.today()}, "
          f"{platform.machine()} x {os.cpu_count()} cores, torch {torch.__version__}\n")
    print(lm_table(rows))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codes", type=int, nargs="+", default=[16384, 65536], help="image codes per run")
    parser.add_argument("--lm", default="0.5b", help="benchmarks/scale.py's Qwen2.5 shape (0.5b, 1.5b, 7b)")
    parser.add_argument("--quick", action="store_true", help="scale.py's tiny shape instead (seconds)")
    parser.add_argument("--layers", type=int, default=0, help="LM layers (0: the shape's)")
    parser.add_argument("--batch", type=int, default=4, help="samples per step")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps; the first is warm-up")
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1] / "outputs" / "bench_lm_codes"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
