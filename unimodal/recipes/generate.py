"""Generate with a fine-tuned unified LM: text-to-image, image-to-text, text-to-text.

    unimodal generate --model runs/digits/final --prompts "a handwritten digit seven" \
        --num_images_per_prompt 4 --seed 0
    unimodal generate --model runs/digits/final --prompts_file prompts.txt --dtype bfloat16
    unimodal generate --model runs/digits/final --prompts "a handwritten digit two" --decoding jacobi --compile true
    unimodal generate --model runs/digits/final --mode image-to-text --images a.png b.png
    python recipes/generate.py --config examples/digits/generate.yaml --guidance_scale 5   # a clone

``model`` is a folder written by ``UnimodalPipeline.save_pretrained`` (what ``unimodal finetune``
saves) or a Hub repo. Sampling starts from the model's own settings (its
``generation_config.json``; see `unimodal.generation.model_sampling`), or from the ``liquid``
preset (images) / ``greedy`` (text) when it has none; ``--preset`` picks another start and any
field given overrides it. Text-to-image writes ``images/NNNN.png``, ``grid.png`` (one row per prompt)
and ``generation.json`` (settings + the prompt and seed of every image: rerunning one prompt with
``--seed <its seed> --num_images_per_prompt 1`` reproduces that image). The other modes write
``generation.json`` with the generated texts and print them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from unimodal.errors import UserError
from unimodal.generation import DECODINGS, model_sampling, resolve_sampling
from unimodal.images import make_grid
from unimodal.pipeline import UnimodalPipeline
from unimodal.training import parse_config

MODES = ("text-to-image", "image-to-text", "text-to-text")


@dataclass
class GenerateConfig:
    """Options of ``unimodal generate`` (YAML keys or ``--name value`` flags)."""

    model: str = ""  # pipeline folder or Hub repo
    mode: str = "text-to-image"  # one of MODES
    prompts: list[str] = field(default_factory=list)  # captions, questions or text to continue
    prompts_file: str = ""  # one prompt per line (blank lines skipped), after `prompts`
    images: list[str] = field(default_factory=list)  # image-to-text: one image file per prompt
    output_dir: str = "outputs/generate"
    # sampling: a preset, then any field set here overrides it
    preset: str = ""  # default: the model's own settings, else "liquid" for images, "greedy" for text
    guidance_scale: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    do_sample: bool | None = None
    negative_prompt: str | None = None  # text-to-image: instead of the empty caption
    num_images_per_prompt: int = 4
    seed: int = 0  # image i (in output order) uses seed + i; text row i likewise
    batch_size: int | None = None  # images per forward pass (default: all)
    # text-to-image speed: "token" or "jacobi" (speculative Jacobi decoding, `window` drafts per
    # forward pass: the same distribution, fewer passes); a static KV cache; a compiled decode
    # step (torch.compile: inductor on CPU, CUDA graphs on GPU; the first batch pays the compile)
    decoding: str = "token"
    window: int = 16
    static_cache: bool = False
    compile: bool = False
    max_new_tokens: int = 64
    dtype: str = "float32"  # or "bfloat16" (much faster matmuls on recent CPUs and on GPUs)
    device: str = ""  # default: cuda if available, else cpu


def read_prompts(cfg: GenerateConfig) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        prompts += [line.strip() for line in Path(cfg.prompts_file).read_text().splitlines() if line.strip()]
    if cfg.mode == "image-to-text" and not prompts:
        prompts = [""] * len(cfg.images)  # plain captioning
    if not prompts:
        raise UserError("no prompts: pass --prompts \"...\" or --prompts_file FILE")
    return prompts


def main(args: list[str] | None = None, prog: str | None = None) -> dict:
    (cfg,) = parse_config((GenerateConfig,), args, prog=prog, description=__doc__)
    if cfg.mode not in MODES:
        raise UserError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.decoding not in DECODINGS:
        raise UserError(f"decoding must be one of {DECODINGS}, got {cfg.decoding!r}")
    if cfg.window < 1:
        raise UserError(f"window must be >= 1 draft token per forward pass, got {cfg.window}")
    if not cfg.model:
        raise UserError("pass --model: a folder saved by UnimodalPipeline.save_pretrained, or a Hub repo")
    task = "image" if cfg.mode == "text-to-image" else "text"
    if task == "text" and cfg.guidance_scale not in (None, 1.0):
        raise UserError("guidance_scale applies to text-to-image only")
    prompts = read_prompts(cfg)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = UnimodalPipeline.from_pretrained(cfg.model, dtype=getattr(torch, cfg.dtype), device=device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Where the settings start: --preset, else the model's own (else its fallback preset); the
    # fields given override them.
    base, source = (cfg.preset, f"preset {cfg.preset}") if cfg.preset else model_sampling(pipe.model, task)
    sampling = resolve_sampling(base, guidance_scale=cfg.guidance_scale, temperature=cfg.temperature,
                                top_k=cfg.top_k, top_p=cfg.top_p, do_sample=cfg.do_sample)
    where = "the model's generation_config.json" if source == "model" else source
    print(f"sampling settings from {where}: {dataclasses.asdict(sampling)}")
    # source: "model" or "preset <name>"; `sampling` is what was used (overrides applied).
    record: dict[str, Any] = {"config": dataclasses.asdict(cfg), "sampling_source": source,
                              "sampling": dataclasses.asdict(sampling)}

    if cfg.mode == "text-to-image":
        n = cfg.num_images_per_prompt
        seeds = [cfg.seed + i for i in range(len(prompts) * n)]
        images = pipe.generate_images(prompts, n, preset=sampling, negative_prompt=cfg.negative_prompt,
                                      seed=seeds, batch_size=cfg.batch_size, decoding=cfg.decoding,
                                      window=cfg.window, static_cache=cfg.static_cache, compile=cfg.compile)
        (out / "images").mkdir(exist_ok=True)
        entries = []
        for i, (image, seed) in enumerate(zip(images, seeds)):
            path = f"images/{i:04d}.png"
            image.save(out / path)
            entries.append({"file": path, "prompt": prompts[i // n], "seed": seed})
        make_grid(images, ncols=n).save(out / "grid.png")
        record["images"] = entries
        print(f"{len(images)} images, grid and settings in {out}")
    else:
        inputs = [Image.open(p) for p in cfg.images] if cfg.mode == "image-to-text" else None
        if inputs is not None and len(inputs) != len(prompts):
            raise UserError(f"{len(inputs)} images for {len(prompts)} prompts: pass one image per prompt")
        texts = pipe.generate_text(prompts, inputs, preset=sampling, max_new_tokens=cfg.max_new_tokens,
                                   seed=[cfg.seed + i for i in range(len(prompts))])
        entries = [{"prompt": p, "image": img, "text": t, "seed": cfg.seed + i}
                   for i, (p, img, t) in enumerate(zip(prompts, cfg.images or [None] * len(prompts), texts))]
        for e in entries:
            print(f"{e['image'] or e['prompt']!r} -> {e['text']!r}")
        record["texts"] = entries

    (out / "generation.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    from unimodal.cli import run_recipe

    run_recipe(main)
