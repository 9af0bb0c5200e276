"""Evaluate a unified text + image LM end to end, and write the numbers as JSON and Markdown.

Three layers, each usable alone and on any labelled image data (digits are one example):

- scoring, on images and captions you already have: `score_tokenizer` (PSNR, SSIM, codebook use,
  and whether a classifier still recognises the reconstructions), `score_text_to_image` (prompt
  fidelity, per-class diversity against real images, FID over a feature extractor),
  `score_image_to_text` (caption accuracy);
- `evaluate_model`: generates a class-by-sample grid and captions held-out images with a
  `UnimodalPipeline`, then scores them (one `ModelEvaluation` per model);
- reporting: `check_targets` and `write_report` (``metrics.json`` + ``report.md`` with tables,
  per-class numbers, stage times and image links), so several models (e.g. VQ-GAN vs the pixel
  baseline) sit side by side.

A judge classifier (``pixels [B, 3, H, W] in [-1, 1] -> logits``) must be trained on real
images; its held-out accuracy is the ceiling of every classifier-based number here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .images import make_grid, tensor_to_pil
from .metrics import (
    FeatureFn,
    Images,
    as_pixels,
    caption_accuracy,
    classifier_accuracy,
    fid,
    per_class_diversity,
    prompt_fidelity,
    reconstruction_metrics,
)


# ---------------------------------------------------------------- scores


@dataclass
class TokenizerScores:
    """Reconstruction quality of an image tokenizer on held-out images."""

    tokens_per_image: int
    codebook_size: int
    psnr: float  # dB
    ssim: float
    codebook_usage: float  # fraction of the codebook used on these images
    codebook_perplexity: float  # effective number of codes
    recon_accuracy: float | None = None  # judge accuracy on reconstructions (class kept?)
    recon_fid: float | None = None  # FID(reconstructions, originals): a floor for generations


@torch.no_grad()
def score_tokenizer(
    tokenizer,
    images: Images,
    labels: Sequence[int] | torch.Tensor | None = None,
    classifier: FeatureFn | None = None,
    feature_extractor: FeatureFn | None = None,
    ssim_sigma: float = 1.5,
    batch_size: int = 64,
) -> TokenizerScores:
    """Encode + decode ``images`` with ``tokenizer`` (`VQGAN`, `PixelTokenizer`, ...) and score it.

    With ``classifier`` and ``labels`` also the judge's accuracy on the reconstructions; with
    ``feature_extractor`` the FID between reconstructions and originals.
    """
    if classifier is not None and labels is None:
        raise ValueError("pass labels= with classifier= to score the reconstructions' class")
    pixels = as_pixels(images)
    report = reconstruction_metrics(tokenizer, pixels, batch_size, ssim_sigma)
    recon_accuracy = recon_fid = None
    if classifier is not None or feature_extractor is not None:
        device = next(tokenizer.parameters()).device
        recon = torch.cat([tokenizer.decode(tokenizer.encode(b.to(device))).float().cpu()
                           for b in pixels.split(batch_size)])  # [N, 3, H, W]
        if classifier is not None:
            recon_accuracy = classifier_accuracy(classifier, recon, labels)
        if feature_extractor is not None:
            recon_fid = fid(pixels, recon, feature_extractor)
    return TokenizerScores(
        tokens_per_image=int(tokenizer.num_image_tokens), codebook_size=int(tokenizer.codebook_size),
        psnr=report.psnr, ssim=report.ssim, codebook_usage=report.codebook_usage,
        codebook_perplexity=report.codebook_perplexity, recon_accuracy=recon_accuracy, recon_fid=recon_fid,
    )


def distinct_fraction(images: Images) -> float:
    """Fraction of ``images`` that are pairwise different (1: all distinct, 1/N: all identical)."""
    pixels = as_pixels(images)
    digests = {hashlib.sha1(p.contiguous().numpy().tobytes()).hexdigest() for p in pixels.float()}
    return len(digests) / len(pixels)


@dataclass
class TextToImageScores:
    """Text-to-image quality of images generated from prompts naming a class."""

    prompt_fidelity: float  # judge accuracy against the class the prompt named
    per_class_fidelity: dict[int, float]
    diversity: float  # mean within-class feature distance of the generations
    real_diversity: float  # the same on real images: what "not collapsed" looks like
    min_diversity_ratio: float  # min over classes of generated / real diversity
    distinct_fraction: float  # share of pairwise different images within each class, averaged
    collapsed_classes: list[int]  # classes whose generations are all identical
    fid: float | None  # FID(real, generated) over the feature extractor


def score_text_to_image(
    generated: Images,
    prompt_labels: Sequence[int] | torch.Tensor,
    real: Images,
    real_labels: Sequence[int] | torch.Tensor,
    classifier: FeatureFn,
    feature_extractor: FeatureFn | None = None,
) -> TextToImageScores:
    """Score generations against the classes their prompts named and against real images.

    Diversity uses ``feature_extractor`` (raw pixels when None); FID needs it and is None without.
    Every class needs >= 2 generated and >= 2 real images.
    """
    gen, real_px = as_pixels(generated), as_pixels(real)
    labels = torch.as_tensor(prompt_labels, dtype=torch.long)
    real_labels = torch.as_tensor(real_labels, dtype=torch.long)
    fidelity = prompt_fidelity(classifier, gen, labels)
    div = per_class_diversity(gen, labels, feature_extractor)
    real_div = per_class_diversity(real_px, real_labels, feature_extractor)
    missing = sorted(set(div.per_class) - set(real_div.per_class))
    if missing:
        raise ValueError(f"classes {missing} have generations but no real images to compare with")
    ratio = min(div.per_class[c] / real_div.per_class[c] for c in div.per_class)
    distinct = [distinct_fraction(gen[labels == c]) for c in labels.unique()]
    # Real diversity over the generated classes only, so the two means cover the same classes.
    real_mean = sum(real_div.per_class[c] for c in div.per_class) / len(div.per_class)
    return TextToImageScores(
        prompt_fidelity=fidelity.accuracy, per_class_fidelity=fidelity.per_class, diversity=div.mean,
        real_diversity=real_mean, min_diversity_ratio=ratio, distinct_fraction=sum(distinct) / len(distinct),
        collapsed_classes=div.collapsed,
        fid=None if feature_extractor is None else fid(real_px, gen, feature_extractor),
    )


@dataclass
class ImageToTextScores:
    """Captioning quality: does the caption name the image's class?"""

    caption_accuracy: float
    per_class_accuracy: dict[int, float]
    examples: list[dict] = field(default_factory=list)  # first few {label, caption}


def score_image_to_text(
    captions: Sequence[str], labels: Sequence[int] | torch.Tensor,
    parse: Callable[[str], int | None], num_examples: int = 10,
) -> ImageToTextScores:
    """Accuracy of ``parse(caption) == label`` overall and per class (see `caption_accuracy`)."""
    labels = [int(x) for x in labels]
    accuracy = caption_accuracy(captions, labels, parse)
    per_class = {}
    for c in sorted(set(labels)):
        rows = [i for i, y in enumerate(labels) if y == c]
        per_class[c] = caption_accuracy([captions[i] for i in rows], [c] * len(rows), parse)
    examples = [{"label": y, "caption": t} for y, t in list(zip(labels, captions))[:num_examples]]
    return ImageToTextScores(accuracy, per_class, examples)


# ---------------------------------------------------------------- generate + score one model


@dataclass
class ModelEvaluation:
    """Everything measured about one fine-tuned model (one row of the report)."""

    name: str
    sequence_length: int  # tokens of one text-to-image training sample
    tokenizer: TokenizerScores
    text_to_image: TextToImageScores
    image_to_text: ImageToTextScores
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    images: dict[str, str] = field(default_factory=dict)  # what -> PNG path, relative to the report
    settings: dict[str, float | int | str] = field(default_factory=dict)  # e.g. {"fine-tune epochs": 6}


@torch.no_grad()
def caption_images(pipeline, images: Sequence[Image.Image], batch_size: int = 64,
                   max_new_tokens: int = 16) -> list[str]:
    """Greedy captions (image-to-text with an empty prompt) for ``images``, in batches."""
    captions = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        captions += pipeline.generate_text([""] * len(chunk), chunk, max_new_tokens=max_new_tokens)
    return [c.strip() for c in captions]


def evaluate_model(
    name: str,
    pipeline,
    prompts: Sequence[str],
    real_images: Sequence[Image.Image],
    real_labels: Sequence[int],
    classifier: FeatureFn,
    parse_caption: Callable[[str], int | None],
    out_dir: str | os.PathLike,
    *,
    feature_extractor: FeatureFn | None = None,
    samples_per_prompt: int = 20,
    grid_columns: int = 8,
    guidance_scale: float = 3.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    ssim_sigma: float = 1.5,
    sequence_length: int = 0,
    display_size: int | None = None,
) -> ModelEvaluation:
    """Generate, caption and score one model; writes its PNGs into ``out_dir``.

    ``prompts[c]`` names class ``c``: each gets ``samples_per_prompt`` images, the first
    ``grid_columns`` of which go into ``<name>-text-to-image.png`` (one row per class). The real
    (held-out) images are captioned and are the reference for diversity and FID; the first 8
    with their reconstructions go into ``<name>-reconstructions.png``. ``display_size`` enlarges
    each image in those PNGs to that side (nearest neighbour, so pixels stay sharp).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = name.lower().replace(" ", "-")
    real_px = as_pixels(real_images)
    seconds = {}

    started = time.perf_counter()
    generated = pipeline.generate_images(
        list(prompts), samples_per_prompt, guidance_scale=guidance_scale, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, batch_size=batch_size, progress=False)
    seconds["generate"] = time.perf_counter() - started
    prompt_labels = [c for c in range(len(prompts)) for _ in range(samples_per_prompt)]

    def grid(images: list[Image.Image], ncols: int) -> Image.Image:
        if display_size:
            images = [im.resize((display_size, display_size), Image.NEAREST) for im in images]
        return make_grid(images, ncols=ncols)

    shown = [im for c in range(len(prompts)) for im in
             generated[c * samples_per_prompt: c * samples_per_prompt + min(grid_columns, samples_per_prompt)]]
    grid(shown, min(grid_columns, samples_per_prompt)).save(out / f"{slug}-text-to-image.png")

    started = time.perf_counter()
    captions = caption_images(pipeline, list(real_images), batch_size)
    seconds["caption"] = time.perf_counter() - started

    tokenizer = pipeline.processor.image_tokenizer
    with torch.no_grad():
        first = real_px[:8].to(tokenizer.device)
        recon = tokenizer.decode(tokenizer.encode(first)).float().cpu()
    grid(tensor_to_pil(torch.cat([real_px[:8], recon])), len(first)).save(out / f"{slug}-reconstructions.png")

    return ModelEvaluation(
        name=name,
        sequence_length=sequence_length,
        tokenizer=score_tokenizer(tokenizer, real_px, real_labels, classifier, feature_extractor, ssim_sigma),
        text_to_image=score_text_to_image(generated, prompt_labels, real_px, real_labels, classifier,
                                          feature_extractor),
        image_to_text=score_image_to_text(captions, real_labels, parse_caption),
        seconds=seconds,
        images={"text-to-image": f"{slug}-text-to-image.png", "reconstructions": f"{slug}-reconstructions.png"},
    )


# ---------------------------------------------------------------- targets and the report


@dataclass
class Target:
    """A quality bar: ``metric`` (a dotted path into `ModelEvaluation`) must be >= or <= ``threshold``."""

    metric: str  # e.g. "text_to_image.prompt_fidelity"
    threshold: float
    higher_is_better: bool = True
    label: str = ""

    def value(self, evaluation: ModelEvaluation) -> float:
        node = asdict(evaluation)
        for key in self.metric.split("."):
            if not isinstance(node, dict) or key not in node:
                raise KeyError(f"{self.metric!r} is not a metric of ModelEvaluation (no {key!r})")
            node = node[key]
        return float(node)

    def passed(self, evaluation: ModelEvaluation) -> bool:
        v = self.value(evaluation)
        return v >= self.threshold if self.higher_is_better else v <= self.threshold


def check_targets(evaluation: ModelEvaluation, targets: Sequence[Target]) -> list[dict]:
    """One ``{label, metric, value, threshold, passed}`` row per target."""
    return [{"label": t.label or t.metric, "metric": t.metric, "value": t.value(evaluation),
             "threshold": t.threshold, "op": ">=" if t.higher_is_better else "<=", "passed": t.passed(evaluation)}
            for t in targets]


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# (row label, value of one model) of the report's side-by-side comparison table
COMPARISON_ROWS: list[tuple[str, Callable[[ModelEvaluation], str]]] = [
    ("image tokens per image", lambda e: str(e.tokenizer.tokens_per_image)),
    ("text-to-image sample length (tokens)", lambda e: str(e.sequence_length)),
    ("codebook size", lambda e: str(e.tokenizer.codebook_size)),
    ("PSNR (dB)", lambda e: _fmt(e.tokenizer.psnr, 2)),
    ("SSIM", lambda e: _fmt(e.tokenizer.ssim)),
    ("codebook usage", lambda e: _pct(e.tokenizer.codebook_usage)),
    ("codebook perplexity", lambda e: _fmt(e.tokenizer.codebook_perplexity, 1)),
    ("judge accuracy on reconstructions", lambda e: _pct(e.tokenizer.recon_accuracy)),
    ("FID reconstructions vs real", lambda e: _fmt(e.tokenizer.recon_fid, 2)),
    ("text-to-image prompt fidelity", lambda e: _pct(e.text_to_image.prompt_fidelity)),
    ("FID generated vs real", lambda e: _fmt(e.text_to_image.fid, 2)),
    ("diversity generated / real (mean)", lambda e: _fmt(e.text_to_image.diversity / e.text_to_image.real_diversity)),
    ("diversity generated / real (worst class)", lambda e: _fmt(e.text_to_image.min_diversity_ratio)),
    ("distinct samples per class", lambda e: _pct(e.text_to_image.distinct_fraction)),
    ("image-to-text caption accuracy", lambda e: _pct(e.image_to_text.caption_accuracy)),
]


def render_report(evaluations: Sequence[ModelEvaluation], *, title: str, targets: Sequence[Target] = (),
                  class_names: Sequence[str] | None = None, notes: Sequence[str] = (),
                  stage_times: dict[str, dict[str, float]] | None = None) -> str:
    """The Markdown report: targets (checked on the first model), the side-by-side comparison,
    per-class numbers, images, caption examples, stage times (``{stage: {column: seconds}}``,
    e.g. ``{"fine-tune": {"wall s": 300, "CPU s": 280}}``) and notes."""
    main, models = evaluations[0], [e.name for e in evaluations]

    def name(c: int) -> str:
        return class_names[c] if class_names is not None and c < len(class_names) else str(c)

    parts = [f"# {title}\n"]
    if targets:
        rows = [[r["label"], f"{r['op']} {_fmt(r['threshold'], 2)}", _fmt(r["value"]),
                 "yes" if r["passed"] else "**no**"] for r in check_targets(main, targets)]
        parts.append(f"## Targets ({main.name})\n\n" + _table(["target", "bar", "measured", "met"], rows))
    settings = dict.fromkeys(k for e in evaluations for k in e.settings)
    stages = dict.fromkeys(s for e in evaluations for s in e.seconds)
    rows = [[k, *[f"{e.settings[k]:g}" if isinstance(e.settings.get(k), float) else _fmt(e.settings.get(k))
                  for e in evaluations]] for k in settings]
    rows += [[label, *[f(e) for e in evaluations]] for label, f in COMPARISON_ROWS]
    rows += [[f"time: {s} (s)", *[_fmt(e.seconds.get(s), 0 if e.seconds.get(s, 0) >= 10 else 1)
                                   for e in evaluations]] for s in stages]
    parts.append("## Comparison\n\n" + _table(["", *models], rows))
    rows = [[name(c), *[f"{_pct(e.text_to_image.per_class_fidelity.get(c))} / "
                        f"{_pct(e.image_to_text.per_class_accuracy.get(c))}" for e in evaluations]]
            for c in sorted(main.text_to_image.per_class_fidelity)]
    parts.append("## Per class (prompt fidelity / caption accuracy)\n\n" + _table(["class", *models], rows))
    for e in evaluations:
        images = "\n\n".join(f"**{what}**\n\n![{e.name} {what}]({path})" for what, path in e.images.items())
        rows = [[name(x["label"]), f"`{x['caption']}`"] for x in e.image_to_text.examples]
        parts.append(f"## {e.name}\n\n{images}\n\nCaptions of held-out images:\n\n"
                     + _table(["true class", "generated caption"], rows))
    if stage_times:
        columns = list(dict.fromkeys(c for t in stage_times.values() for c in t))
        rows = [[stage, *[_fmt(t.get(c), 0) for c in columns]] for stage, t in stage_times.items()]
        parts.append("## Time per stage\n\n" + _table(["stage", *columns], rows))
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts) + "\n"


def write_report(out_dir: str | os.PathLike, evaluations: Sequence[ModelEvaluation], *, title: str,
                 targets: Sequence[Target] = (), class_names: Sequence[str] | None = None,
                 notes: Sequence[str] = (), stage_times: dict[str, dict[str, float]] | None = None,
                 extra: dict | None = None) -> tuple[Path, Path]:
    """Write ``metrics.json`` (every number, targets included) and ``report.md``; returns both paths."""
    if not evaluations:
        raise ValueError("write_report needs at least one ModelEvaluation")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {
        "models": {e.name: asdict(e) for e in evaluations},
        "targets": check_targets(evaluations[0], targets),
        "stage_times": stage_times or {},
        **(extra or {}),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "report.md").write_text(render_report(evaluations, title=title, targets=targets, class_names=class_names,
                                                 notes=notes, stage_times=stage_times))
    return out / "metrics.json", out / "report.md"
