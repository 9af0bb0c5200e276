"""Text-to-image sampling speed: our batched CFG on one KV cache vs what users have today.

    python benchmarks/generate.py                              # tiny Llama, fp32, batch 1/4/16
    python benchmarks/generate.py --models tiny smollm2 --dtype bfloat16
    python benchmarks/generate.py --models tiny smollm2 --batches 1 4 --digits_model outputs/digits-demo/final

Rows, all with classifier-free guidance (Liquid's settings: guidance 7, temperature 0.9, top-k
4096, top-p 0.99) and a 16x16 grid (256 image tokens) over an 8192-code image vocabulary:

- ``ours``: `unimodal.generation.sample_image_tokens` (cond + uncond rows in one forward per step,
  KV cache, logits over the image ids only, per-row random streams);
- ``hf``: ``model.generate(guidance_scale=7, negative_prompt_ids=...)``: transformers' CFG runs
  the unconditional rows in a second forward with its own cache (the span constraint is passed
  as a logits processor so both sample the same kind of tokens);
- ``naive``: cond + uncond batched, but every step re-runs the whole sequence (no KV cache);
  measured over the first ``--naive_steps`` tokens only (it gets slower with length, so its
  tokens/s here flatters it);
- ``bare``: our forward steps alone (prefill + 255 cached steps, image-row logits), no guidance,
  warping or sampling; ``bare-full`` computes all logits.

Overhead of sampling and constraints over the forward passes, two ways: ``overhead in-run`` times
the forwards inside one ``ours`` run (everything else / forwards; robust to load drifting between
runs), ``ours / bare - 1`` compares separate runs (what the target literally asks, noisier).

Faster decoding (``--methods``; a second table, one row per model, batch and method), each
against ``hf`` in the same run: ``token`` (the ``ours`` row), ``jacobi`` (speculative Jacobi
decoding, ``--window`` drafts per pass), ``static`` (static KV cache), ``compiled`` (static
cache + `torch.compile`d decode step; its one-time compile is the ``warm-up s`` column, wall
seconds, excluded from tok/s), ``jacobi+static`` and ``jacobi+compiled`` (the verify passes
compiled with dynamic shapes). Columns: tokens/s, x hf, forward passes per
image (per batch of rows, prefill included) and the draft acceptance rate. The random-weight
models are labelled so: their acceptance says nothing (it depends on how peaked the trained
distribution is); speed does not depend on the weights. Trained models: ``--digits_model
outputs/digits-demo/final`` (``make demo``) and ``--smollm2_model outputs/smollm2-digits/final``
(``python examples/digits/run.py --config examples/smollm2/demo.yaml``), sampled with their own
settings and a digits caption.

Quality on digits (a table per trained model): prompt fidelity and FID (judge features, the
run's ``classifier/`` next to ``final/``) of ``--quality_samples`` images per digit, for
token-by-token decoding with ``--seeds`` (their spread is the run-to-run noise) and Jacobi with
the same seeds; forward passes there are per batch of ``--quality_batch`` rows (1: per image).

Times are CPU seconds of this process (``time.process_time``; with the default single thread that
is the work done, whatever other jobs share the machine), best of ``--repeats`` alternating runs.
The models are random (speed does not depend on the weights). Read the ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from functools import partial
from pathlib import Path

import torch

from unimodal import PixelTokenizer, PixelTokenizerConfig, add_image_tokens
from unimodal.evaluation.scoring import score_text_to_image
from unimodal.generation import (
    DecodeStats,
    ImageSpanConstraint,
    KVDecoder,
    decode_image_ids,
    model_sampling,
    resolve_sampling,
    sample_image_tokens,
)
from unimodal.offline import build_causal_lm, train_text_tokenizer
from unimodal.outputs import resolve_output
from unimodal.pipeline import UnimodalPipeline

MODELS = {
    # name -> build_causal_lm kwargs (the text vocabulary is padded to `vocab_size` rows)
    "tiny": dict(vocab_size=512, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
    "smollm2": dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, tie_word_embeddings=True),
}
PROMPT = "a small house by the sea under a blue sky"


def build(name: str, dtype: torch.dtype, codebook_size: int, side: int):
    tok = train_text_tokenizer()
    model = build_causal_lm("llama", max_position_embeddings=2048, **MODELS[name])
    image_tokenizer = PixelTokenizer(PixelTokenizerConfig(codebook_size=codebook_size, image_size=side))
    processor = add_image_tokens(model, tok, image_tokenizer, mean_resizing=False)
    return model.to(dtype).eval(), processor


def best_of(repeats: int, runs: dict) -> dict:
    """CPU seconds per run, best of ``repeats``; the runs take turns so drifting load hits all alike."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - start)
    return best


@torch.no_grad()
def run_ours(model, processor, batch, sampling, prompt: str = PROMPT, **options):
    """`sample_image_tokens` of ``batch`` rows; ``options``: decoding, window, static_cache, compile, stats."""
    rows = [processor.text_to_image_ids(prompt)] * batch
    sample_image_tokens(model, processor, rows, sampling, seed=0, progress=False, **options)


def split_ours(model, processor, batch, sampling) -> float:
    """One `run_ours`, timing its forward passes (`KVDecoder._forward`) inside it: returns
    ``(total - forwards) / forwards``, the cost of everything else (guidance, filters, sampling,
    bookkeeping) relative to the forwards, measured under the same load."""
    spent = [0.0]
    forward = KVDecoder._forward

    def timed(self, *args):
        start = time.process_time()
        out = forward(self, *args)
        spent[0] += time.process_time() - start
        return out

    KVDecoder._forward = timed
    try:
        start = time.process_time()
        run_ours(model, processor, batch, sampling)
        total = time.process_time() - start
    finally:
        KVDecoder._forward = forward
    return total / spent[0] - 1


def left_pad(processor, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, L]`` of ``rows``, left-padded by the processor."""
    batch = processor.pad(rows, padding_side="left")
    return batch["input_ids"], batch["attention_mask"]


@torch.no_grad()
def run_hf(model, processor, batch, sampling, tokens: int | None = None, prompt: str = PROMPT):
    """transformers' CFG; ``tokens``: stop after that many of the image's tokens (default all)."""
    ids, mask = left_pad(processor, [processor.text_to_image_ids(prompt)] * batch)
    neg, neg_mask = left_pad(processor, [processor.unconditional_prompt_ids()] * batch)
    ids, mask, neg, neg_mask = (t.to(model.device) for t in (ids, mask, neg, neg_mask))  # a model on a GPU
    n = tokens or processor.num_image_tokens
    constraint = ImageSpanConstraint.from_processor(processor, max_length=ids.shape[1] + processor.num_image_tokens)
    model.generate(input_ids=ids, attention_mask=mask, guidance_scale=sampling.guidance_scale,
                   negative_prompt_ids=neg, negative_prompt_attention_mask=neg_mask, do_sample=True,
                   temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                   max_new_tokens=n, min_new_tokens=n, logits_processor=[constraint])


@torch.no_grad()
def run_naive(model, processor, batch, sampling, steps):
    lo, hi = processor.image_token_range
    rows = [processor.text_to_image_ids(PROMPT)] * batch + [processor.unconditional_prompt_ids()] * batch
    ids, mask = left_pad(processor, rows)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        cond, uncond = logits[:, -1, lo:hi].float().chunk(2)
        guided = (uncond + sampling.guidance_scale * (cond - uncond)) / sampling.temperature
        kth = guided.topk(min(sampling.top_k, hi - lo)).values[:, -1:]
        probs = guided.masked_fill(guided < kth, float("-inf")).softmax(-1)
        nxt = torch.multinomial(probs, 1, generator=g) + lo  # [B, 1] (top-p left out: flatters naive)
        ids = torch.cat([ids, nxt.repeat(2, 1)], 1)
        mask = torch.cat([mask, torch.ones_like(nxt).repeat(2, 1)], 1)


@torch.no_grad()
def run_bare(model, processor, batch, sliced):
    lo, hi = processor.image_token_range
    ids, mask = left_pad(processor, [processor.text_to_image_ids(PROMPT)] * batch
                         + [processor.unconditional_prompt_ids()] * batch)
    decoder = KVDecoder(model, vocab_slice=(lo, hi) if sliced else None)
    decoder.prefill(ids, mask)
    token = torch.full((2 * batch,), lo)
    for _ in range(processor.num_image_tokens - 1):
        decoder.step(token)


METHODS = {  # name -> sample_image_tokens options (the Jacobi ones also get --window)
    "token": {},
    "jacobi": {"decoding": "jacobi"},
    "static": {"static_cache": True},
    "compiled": {"compile": True},
    "jacobi+static": {"decoding": "jacobi", "static_cache": True},
    "jacobi+compiled": {"decoding": "jacobi", "compile": True},
}


def digits_module():
    """The digits demo's module (its data set, captions and judge), from examples/digits."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))
    import digits

    return digits


def trained(path: str, dtype: torch.dtype):
    """A fine-tuned pipeline folder: its model, processor and own sampling settings."""
    pipe = UnimodalPipeline.from_pretrained(path, dtype=dtype)
    return pipe.model.eval(), pipe.processor, model_sampling(pipe.model, "image")[0]


def method_rows(label: str, model, processor, sampling, prompt: str, args) -> None:
    """One row per batch and method: tok/s, x hf, forward passes per image, acceptance, warm-up."""
    n = processor.num_image_tokens
    for batch in args.batches:
        options = {m: dict(METHODS[m], **({"window": args.window} if "jacobi" in m else {})) for m in args.methods}
        warm_up = {}
        for method, opts in options.items():  # allocator, kernels and the compile, on the wall clock
            stats, start = DecodeStats(), time.perf_counter()
            run_ours(model, processor, batch, sampling, prompt, stats=stats, **opts)
            warm_up[method] = (time.perf_counter() - start, stats.compile_seconds)
        stats_of = {m: DecodeStats() for m in options}  # summed over the timed repeats (seeded: the same each)
        runs = {m: partial(run_ours, model, processor, batch, sampling, prompt, stats=stats_of[m], **opts)
                for m, opts in options.items()}
        if "hf" not in args.skip:
            runs["hf"] = partial(run_hf, model, processor, batch, sampling, prompt=prompt)
        t = best_of(args.repeats, runs)
        for method in options:
            stats = stats_of[method]
            warm = f"{warm_up[method][1]:.1f}" if warm_up[method][1] else "-"
            vs_hf = t.get("hf", float("nan")) / t[method]
            print(f"| {label} | {batch} | {method} | {batch * n / t[method]:.0f} | {vs_hf:.2f}x | "
                  f"{stats.forward_passes / args.repeats:.0f} / {n} | {100 * stats.acceptance:.0f}% | {warm} |",
                  flush=True)


def quality_rows(label: str, path: str, dtype: torch.dtype, args) -> None:
    """Prompt fidelity and FID on digits: token-by-token with each seed (the noise), then Jacobi.
    ``path`` is a final/ folder of `examples/digits/run.py` (its judge is saved next to it)."""
    digits = digits_module()
    model, processor, sampling = trained(path, dtype)
    judge = digits.DigitClassifier.load(Path(resolve_output(path)).parent / "classifier")  # the demo saves it there
    test = digits.load_digits_dataset(judge.config.image_size, "test", seed=0)
    labels = [d for d in range(10) for _ in range(args.quality_samples)]
    rows = [processor.text_to_image_ids(digits.caption_for(d)) for d in labels]
    chunks = -(-len(rows) // args.quality_batch)
    print(f"\n{label}: {len(rows)} images ({args.quality_samples} per digit) in batches of {args.quality_batch}, "
          f"the model's settings {sampling}; FID over the judge's features\n")
    print("| method | seed | prompt fidelity | FID | forward passes / image | acceptance | CPU s |")
    print("|---|---|---|---|---|---|---|")
    passes: dict[str, list[float]] = {"token": [], "jacobi": []}  # per image (or batch), per seed
    for method in passes:
        for seed in args.seeds:
            stats, start = DecodeStats(), time.process_time()
            ids = sample_image_tokens(model, processor, rows, sampling, seed=seed, batch_size=args.quality_batch,
                                      progress=False, decoding=method, window=args.window, stats=stats)
            seconds = time.process_time() - start
            scores = score_text_to_image(decode_image_ids(processor, ids), labels, test["image"], test["label"],
                                         judge, judge.features)
            passes[method].append(stats.forward_passes / chunks)
            print(f"| {method} | {seed} | {100 * scores.prompt_fidelity:.1f}% | {scores.fid:.2f} | "
                  f"{passes[method][-1]:.2f} / {processor.num_image_tokens} | "
                  f"{100 * stats.acceptance:.0f}% | {seconds:.0f} |", flush=True)
    mean = {method: sum(p) / len(p) for method, p in passes.items()}
    print(f"\nForward passes, mean over the seeds: token {mean['token']:.3f}, jacobi {mean['jacobi']:.3f} "
          f"({mean['jacobi'] / mean['token']:.3f}x token-by-token)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["tiny"], choices=sorted(MODELS),
                        help="random-weight shapes (none: only the trained models)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--codebook_size", type=int, default=8192)
    parser.add_argument("--grid", type=int, default=16, help="side of the code grid (16 -> 256 tokens)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--naive_steps", type=int, default=32)
    parser.add_argument("--skip", nargs="*", default=[], choices=["hf", "naive", "speed"],
                        help="speed: skip the first table (ours vs hf / naive / bare)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--window", type=int, default=16, help="Jacobi drafts per forward pass")
    parser.add_argument("--digits_model", default="", help="the digits demo's final/ (make demo)")
    parser.add_argument("--smollm2_model", default="", help="examples/smollm2's final/ (a trained SmolLM2-135M)")
    parser.add_argument("--quality_samples", type=int, default=20, help="images per digit in the quality table")
    parser.add_argument("--quality_batch", type=int, default=8)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1_000_000, 2_000_000],
                        help="quality seeds (far apart: image i of seed s uses s + i)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads; times are CPU seconds, summed over threads, so keep 1 "
                             "unless the machine is yours")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    sampling = resolve_sampling("liquid")
    n = args.grid * args.grid
    print(f"# {date.today()}, {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {args.dtype}, {n} image tokens, codebook {args.codebook_size}\n")
    if "speed" not in args.skip:
        speed_table(args, dtype, sampling, n)
    print("\n| model | batch | method | tok/s | x hf | forward passes / image | acceptance | warm-up s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model, processor = build(name, dtype, args.codebook_size, args.grid)
        method_rows(f"{name} (random weights)", model, processor, sampling, PROMPT, args)
    trained_models = [(label, path) for label, path in (("digits demo (trained)", args.digits_model),
                                                        ("SmolLM2-135M (trained)", args.smollm2_model)) if path]
    for label, path in trained_models:
        model, processor, own = trained(path, dtype)
        method_rows(label, model, processor, own, digits_module().caption_for(7), args)
    for label, path in trained_models:
        quality_rows(label, path, dtype, args)


def speed_table(args, dtype: torch.dtype, sampling, n: int) -> None:
    """Ours vs transformers' generate, no cache, and the bare forwards (sampling overhead)."""
    print("| model | batch | ours tok/s | hf tok/s | naive tok/s | ours / hf | ours / naive | overhead in-run "
          "| ours / bare - 1 | bare-full / bare |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model, processor = build(name, dtype, args.codebook_size, args.grid)
        run_ours(model, processor, 1, sampling)  # warm-up (allocator, kernels)
        for batch in args.batches:
            # Each timed call is bound to this loop's model and batch (best_of runs them right away).
            runs = {"ours": partial(run_ours, model, processor, batch, sampling),
                    "bare": partial(run_bare, model, processor, batch, True),
                    "full": partial(run_bare, model, processor, batch, False)}
            if "hf" not in args.skip:
                runs["hf"] = partial(run_hf, model, processor, batch, sampling)
            t = best_of(args.repeats, runs)
            overhead = min(split_ours(model, processor, batch, sampling) for _ in range(args.repeats))
            naive = float("nan")
            if "naive" not in args.skip:
                naive = best_of(1, {"naive": partial(run_naive, model, processor, batch, sampling, args.naive_steps)})
                naive = naive["naive"] / (batch * args.naive_steps)
            ours, hf = t["ours"] / (batch * n), t.get("hf", float("nan")) / (batch * n)
            print(f"| {name} | {batch} | {1 / ours:.0f} | {1 / hf:.0f} | {1 / naive:.0f} | {hf / ours:.2f}x | "
                  f"{naive / ours:.1f}x | {100 * overhead:+.1f}% | {100 * (t['ours'] / t['bare'] - 1):+.1f}% | "
                  f"{t['full'] / t['bare']:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
