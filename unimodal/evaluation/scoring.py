"""Scores of a unified text + image LM on images and captions you already have.

- `score_tokenizer`: PSNR, SSIM, codebook use of the image tokenizer's reconstructions, and
  whether a judge classifier still recognises them (and their FID against the originals);
- `score_text_to_image`: prompt fidelity, per-class diversity against real images, FID;
- `score_image_to_text`: caption accuracy, overall and per class;
- `ModelEvaluation`: all three for one model, what `evaluate_model` returns and the report shows.

A judge classifier (``pixels [B, 3, H, W] in [-1, 1] -> logits``) must be trained on real
images; its held-out accuracy is the ceiling of every classifier-based number here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .metrics import (
    FeatureFn,
    Images,
    as_pixels,
    caption_accuracy,
    classifier_accuracy,
    fid,
    per_class_diversity,
    prompt_fidelity,
    reconstruction_report,
)


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
    codes, recon = tokenizer.reconstruct(pixels, batch_size)  # [N, h, w], [N, 3, H, W]
    report = reconstruction_report(pixels, recon, codes, tokenizer.codebook_size, ssim_sigma)
    recon_accuracy = (None if classifier is None or labels is None
                      else classifier_accuracy(classifier, recon, labels))
    recon_fid = None if feature_extractor is None else fid(pixels, recon, feature_extractor)
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
