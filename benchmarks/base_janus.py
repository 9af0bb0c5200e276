"""Janus text-to-image speed with classifier-free guidance at batch 4: ours vs Janus's own
``generate(generation_mode="image")``.

    python benchmarks/base_janus.py                                        # the tiny config (seconds)
    python benchmarks/base_janus.py --configs tiny pro-1b --layers 2 --tokens 64   # + Janus-Pro-1B's shape

Rows (both sample Janus-Pro's settings: guidance 5, temperature 1, no top-k / top-p):

- ``ours``: `unimodal.generation.sample_image_tokens` through the janus base
  (`JanusProcessor.image_decoder`): cond + uncond rows in one forward per step on one dynamic KV
  cache, the generation head's logits only; ``ours static``: the same on a static cache
  (``static_cache=True``, eager);
- ``janus``: ``JanusForConditionalGeneration.generate(generation_mode="image")``: cond + uncond as
  one doubled batch on a static cache (its default), generation head, `torch.multinomial`.

Configs: ``tiny`` is the test suite's model (hidden 32, 2 layers, 64 codes) with a ``--tiny_side``
square grid; ``pro-1b`` has Janus-Pro-1B's language model and generation path (hidden 2048, 16
heads, MLP 5632, 102400 text rows, 16384 codes) with random weights, ``--layers`` of its 24 layers
and a grid of about ``--tokens`` codes (Janus-Pro's is 24 x 24 = 576). Speed does not depend on the
weights. tokens/s counts image tokens (``batch * h * w``) per wall-clock second of the best of
``--repeats`` runs, after a one-row warm-up; run it on an otherwise idle machine.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from common import base_generation_parser, best_of, cpu_name

from unimodal.bases.janus_offline import build_janus
from unimodal.generation import SamplingConfig, sample_image_tokens

CAPTIONS = ["a red square on a blue sky", "two cats", "a lighthouse at night, film grain", "green hills"]
SAMPLING = SamplingConfig(guidance_scale=5.0, temperature=1.0)  # Janus-Pro's generation settings


def janus_generate(model, processor, prompts: list[list[int]], seed: int, **_) -> torch.Tensor:
    """Janus's own image generation; codes ``[B, h*w]``. Its prompts must share one length (it
    counts left pads in the positions), so they are padded to the longest like its processor does."""
    batch = processor.pad(prompts, padding_side="left")
    torch.manual_seed(seed)
    return model.generate(**batch, generation_mode="image", do_sample=True, guidance_scale=SAMPLING.guidance_scale,
                          temperature=SAMPLING.temperature, top_k=None)


def ours_generate(model, processor, prompts: list[list[int]], seed: int, static: bool = False) -> torch.Tensor:
    ids = sample_image_tokens(model, processor, prompts, SAMPLING, seed=seed, progress=False, static_cache=static)
    return processor.vocab.ids_to_codes(ids)


def build(name: str, args):
    if name == "tiny":
        return build_janus(grid=args.tiny_side)
    side = max(1, math.isqrt(args.tokens))
    return build_janus(shape="pro-1b", layers=args.layers, grid=side, dtype=getattr(torch, args.dtype))


def main(argv: list[str] | None = None) -> None:
    parser = base_generation_parser(__doc__, "pro-1b", "Janus-Pro-1B", 24)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {cpu_name()}, {args.threads} threads, torch {torch.__version__}, "
          f"batch {args.batch}, guidance {SAMPLING.guidance_scale}, temperature {SAMPLING.temperature}")
    runs = (("ours", ours_generate, {}), ("ours static", ours_generate, {"static": True}),
            ("janus", janus_generate, {}))
    rows = []
    for name in args.configs:
        model, processor = build(name, args)
        h, w = processor.grid_shape
        prompts = [processor.text_to_image_ids(CAPTIONS[i % len(CAPTIONS)]) for i in range(args.batch)]
        n = args.batch * h * w
        speeds = {}
        with torch.no_grad():
            for label, fn, kw in runs:
                fn(model, processor, prompts[:1], seed=0, **kw)  # warm-up: one image
                seconds, codes = best_of(partial(fn, model, processor, prompts, **kw), args.repeats)
                assert codes.shape == (args.batch, h * w) and int(codes.max()) < processor.vocab.codebook_size
                speeds[label] = n / seconds
        text = model.config.text_config
        rows.append((name, f"{text.hidden_size}x{text.num_hidden_layers}", f"{h}x{w}", speeds))
        del model
    print("\n| config | LM (hidden x layers) | grid | ours tok/s | ours static tok/s | Janus generate tok/s "
          "| ours / generate | ours static / generate |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, shape, grid, s in rows:
        print(f"| {name} | {shape} | {grid} | {s['ours']:.1f} | {s['ours static']:.1f} | {s['janus']:.1f} "
              f"| {s['ours'] / s['janus']:.2f}x | {s['ours static'] / s['janus']:.2f}x |")


if __name__ == "__main__":
    main()
