"""Emu3 text-to-image speed with classifier-free guidance at batch 4: ours vs Emu3's own ``generate``.

    python benchmarks/base_emu3.py                                   # the tiny config (seconds)
    python benchmarks/base_emu3.py --configs tiny full --layers 2 --tokens 64    # + full-size shape

Rows (both sample Emu3-Gen's settings: guidance 3, top-k 2048, temperature 1):

- ``ours``: `unimodal.generation.sample_image_tokens` through the Emu3 base (`Emu3Processor.image_decoder`):
  cond + uncond rows in one forward per step on one KV cache, logits of the visual ids only, the
  end-of-line after each row fed in the same pass as the row's last code;
- ``hf``: ``Emu3ForConditionalGeneration.generate`` as Emu3's docs write it: a
  ``prefix_allowed_tokens_fn`` (visual ids, end-of-line after every row) and its CFG
  (``negative_prompt_ids`` + ``guidance_scale``: a second, unbatched forward with its own cache),
  full-vocabulary logits.

Configs: ``tiny`` is the test suite's model (hidden 32, 2 layers, 64 codes) with a ``--tiny_side``
square grid; ``full`` has Emu3-Gen's text shape (hidden 4096, 32 heads / 8 KV heads, MLP 14336,
vocabulary 184622 with 32768 visual tokens) with random weights, ``--layers`` decoder layers (Emu3-Gen
has 32) and a grid of about ``--tokens`` codes (Emu3-Gen's is 90 x 90 = 8100). Speed does not depend
on the weights. tokens/s counts visual tokens (``batch * h * w``) per wall-clock second of the
best of ``--repeats`` runs, after one short warm-up; run it on an otherwise idle machine.
"""

from __future__ import annotations

import math

import torch
from common import base_generation_parser, best_of, cpu_name

from unimodal.bases.emu3_tiny import build_emu3
from unimodal.generation import SamplingConfig, sample_image_tokens

CAPTIONS = ["a red square on a blue sky", "two cats", "a lighthouse at night, film grain", "green hills"]
FULL_TEXT = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 max_position_embeddings=9216)
FULL_VOCAB, FULL_CODEBOOK = 184622, 32768
SAMPLING = SamplingConfig(guidance_scale=3.0, top_k=2048)  # Emu3-Gen's demo settings


def hf_generate(model, processor, prompts: list[list[int]], seed: int) -> torch.Tensor:
    """Emu3's own sampling: ``generate`` with its prefix constraint and CFG; visual ids ``[B, h*w]``."""
    h, w = processor.grid_shape
    visual = model.vocabulary_mapping.image_tokens
    batch = processor.pad(prompts, padding_side="left")
    negative = processor.pad([processor.unconditional_prompt_ids()] * len(prompts), padding_side="left")
    start = batch["input_ids"].shape[1]

    def allowed(batch_id, input_ids):
        return [processor.eol_token_id] if (input_ids.shape[0] - start + 1) % (w + 1) == 0 else visual

    torch.manual_seed(seed)
    out = model.generate(**batch, max_new_tokens=h * (w + 1) - 1, prefix_allowed_tokens_fn=allowed,
                         negative_prompt_ids=negative["input_ids"],
                         negative_prompt_attention_mask=negative["attention_mask"],
                         guidance_scale=SAMPLING.guidance_scale, do_sample=True, top_k=SAMPLING.top_k,
                         temperature=SAMPLING.temperature, pad_token_id=processor.pad_token_id)
    grid = torch.cat([out[:, start:], out.new_full((len(prompts), 1), processor.eol_token_id)], 1)
    return grid.view(len(prompts), h, w + 1)[:, :, :w].reshape(len(prompts), h * w)


def ours_generate(model, processor, prompts: list[list[int]], seed: int) -> torch.Tensor:
    return sample_image_tokens(model, processor, prompts, SAMPLING, seed=seed, progress=False)


def build(name: str, args) -> tuple:
    if name == "tiny":
        return build_emu3(image_size=2 * args.tiny_side)
    side = max(1, math.isqrt(args.tokens))
    dtype = getattr(torch, args.dtype)
    return build_emu3(codebook_size=FULL_CODEBOOK, image_size=2 * side, vocab_size=FULL_VOCAB, dtype=dtype,
                      num_hidden_layers=args.layers, **FULL_TEXT)


def measure(name: str, args) -> tuple[str, str, str, float, float]:
    """One table row: ``(config, text shape, grid, ours tok/s, generate tok/s)``."""
    model, processor = build(name, args)
    h, w = processor.grid_shape
    prompts = [processor.text_to_image_ids(CAPTIONS[i % len(CAPTIONS)]) for i in range(args.batch)]
    n = args.batch * h * w
    with torch.no_grad():
        for fn in (ours_generate, hf_generate):  # warm-up: one row of one image each
            fn(model, processor, prompts[:1], seed=0)
        ours_s, ours = best_of(lambda seed: ours_generate(model, processor, prompts, seed), args.repeats)
        hf_s, theirs = best_of(lambda seed: hf_generate(model, processor, prompts, seed), args.repeats)
    assert processor.vocab.is_image(ours).all() and processor.vocab.is_image(theirs).all()
    text = model.config.text_config
    return name, f"{text.hidden_size}x{text.num_hidden_layers}", f"{h}x{w}", n / ours_s, n / hf_s


def main(argv: list[str] | None = None) -> None:
    parser = base_generation_parser(__doc__, "full", "Emu3-Gen", 32)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {cpu_name()}, {args.threads} threads, torch {torch.__version__}, "
          f"batch {args.batch}, guidance {SAMPLING.guidance_scale}, top-k {SAMPLING.top_k}")
    rows = [measure(name, args) for name in args.configs]
    print("\n| config | text (hidden x layers) | grid | ours tok/s | Emu3 generate tok/s | ours / generate |")
    print("|---|---|---|---:|---:|---:|")
    for name, shape, grid, ours_tps, hf_tps in rows:
        print(f"| {name} | {shape} | {grid} | {ours_tps:.1f} | {hf_tps:.1f} | {ours_tps / hf_tps:.2f}x |")


if __name__ == "__main__":
    main()
