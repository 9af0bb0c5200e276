"""Evaluation metrics for image tokenizers and unified multimodal LMs, reusable on any data.

Pixels are ``[B, 3, H, W]`` floats in ``[-1, 1]`` (the VQ-GAN convention); functions that take
images also accept a list of PIL images (what `generate_images` returns). What is measured:

- tokenizer reconstruction: `psnr`, `ssim`, `codebook_usage`, `codebook_perplexity`, or all of
  them at once with `reconstruction_metrics` (encode + decode, then `reconstruction_report`);
- text-to-image prompt fidelity: `prompt_fidelity`, the accuracy of a classifier trained on
  real held-out data, applied to images generated from prompts naming a class;
- diversity: `per_class_diversity` (mean pairwise feature distance within each class, with a
  collapse flag) and `fid` over a feature extractor you provide;
- image-to-text: `caption_accuracy` with a parser that reads the class from a caption.

PSNR, SSIM and FID are computed by torchmetrics (SSIM averaged over the region where its window
fits, as skimage and Wang et al. do; see `ssim`). FID with the usual Inception backbone needs
pretrained weights that cannot be downloaded everywhere; `fid` therefore takes the feature
extractor as an argument (e.g. a classifier's penultimate layer, or torchmetrics' Inception when
its weights are at hand).

Classifiers and feature extractors (modules, or bound methods of modules) are put in eval mode
and run without gradients, in batches, on the device of their parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

from ..images import pil_to_tensor
from ..vq.quantizer import code_perplexity

Images = torch.Tensor | Sequence[Image.Image]
FeatureFn = Callable[[torch.Tensor], torch.Tensor]

# Pixels live in [-1, 1]: the data range used by PSNR and SSIM.
DATA_RANGE = 2.0
SSIM_CHUNK_VALUES = 2**18  # input values per torchmetrics call in `ssim`


def as_pixels(images: Images) -> torch.Tensor:
    """A ``[B, 3, H, W]`` tensor in [-1, 1] from a tensor (returned as is) or PIL images."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected pixels of shape [B, 3, H, W], got {tuple(images.shape)}")
        return images
    if isinstance(images, Image.Image):
        images = [images]
    if len(images) == 0:
        raise ValueError("got no images")
    return pil_to_tensor(list(images))


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images to compare must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


# ---------------------------------------------------------------- reconstruction quality


def psnr(pred: Images, target: Images, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``10 log10(R^2 / MSE)`` with data range ``R = 2``.

    Computed per image (MSE over its pixels and channels), then averaged over the batch when
    ``reduction="mean"`` (``"none"`` returns the ``[B]`` values). Identical images give ``inf``
    (uncapped), so a batch mean containing one exact reconstruction is ``inf`` too.
    """
    pred, target = as_pixels(pred).double(), as_pixels(target).double()
    _check_pair(pred, target)
    per_image = peak_signal_noise_ratio(pred, target, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3))
    return _reduce(per_image, reduction)  # [B] or []


def ssim(pred: Images, target: Images, sigma: float = 1.5, reduction: str = "mean") -> torch.Tensor:
    """Structural similarity (Wang et al. 2004): Gaussian window, population covariance.

    The SSIM map is torchmetrics'; it is averaged over the region where the window fits inside
    the image, then over channels, one value per image (``reduction="none"``) or their batch
    mean. That region, not torchmetrics' own mean over a reflect-padded border, is what
    ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=sigma,
    use_sample_covariance=False, data_range=2, channel_axis=0)`` and the paper's code average.
    The border matters: on a blurred 64 px photo crop torchmetrics' mean reads 0.856 where skimage
    reads 0.928 (tests/test_metrics.py), and on 16 px digits only 6x6 of the 16x16 pixels are inside.
    Images need sides of at least ``2 * int(3.5 * sigma + 0.5) + 1`` pixels (11 for
    ``sigma=1.5``); pass a smaller ``sigma`` for tiny images.
    """
    pred, target = as_pixels(pred).double(), as_pixels(target).double()
    _check_pair(pred, target)
    radius = int(3.5 * sigma + 0.5)  # the Gaussian window torchmetrics (and skimage) use: 2r + 1 taps
    if min(pred.shape[-2:]) < 2 * radius + 1:
        raise ValueError(
            f"SSIM window of {2 * radius + 1} px (sigma={sigma}) exceeds the {pred.shape[-2]}x{pred.shape[-1]} "
            f"image; pass a smaller sigma (e.g. sigma=0.5 gives a 5 px window)"
        )
    # torchmetrics holds ~1.7 kB per input value at once (padded copies, float64 products): 22 GB
    # for 4096 crops of 32 px in one call. Chunks of ~2^18 values keep it near 0.5 GB, same speed.
    chunk, per_image = max(1, SSIM_CHUNK_VALUES // pred[0].numel()), []
    for p, t in zip(pred.split(chunk), target.split(chunk)):
        _, ssim_map = structural_similarity_index_measure(
            p, t, gaussian_kernel=True, sigma=sigma, data_range=DATA_RANGE, reduction="none",
            return_full_image=True)  # [b, C, H, W]
        inside = ssim_map[..., radius : ssim_map.shape[-2] - radius, radius : ssim_map.shape[-1] - radius]
        per_image.append(inside.mean(dim=(1, 2, 3)))  # [b]
    return _reduce(torch.cat(per_image), reduction)  # [B] or []


def _code_histogram(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() == 0:
        raise ValueError("got no codes")
    flat = codes.flatten()
    if flat.min() < 0 or flat.max() >= codebook_size:
        raise ValueError(f"codes must lie in [0, {codebook_size}); got [{int(flat.min())}, {int(flat.max())}]")
    return torch.bincount(flat, minlength=codebook_size)  # [K]


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> float:
    """Fraction of the ``codebook_size`` codes that occur at least once in ``codes`` (any shape)."""
    return (_code_histogram(codes, codebook_size) > 0).sum().item() / codebook_size


def codebook_perplexity(codes: torch.Tensor, codebook_size: int) -> float:
    """``exp(entropy)`` of the code frequencies: the effective number of codes in use.

    ``codebook_size`` when all codes are equally frequent, 1 when a single code is used.
    """
    return code_perplexity(_code_histogram(codes, codebook_size).double()).item()


@dataclass
class ReconstructionReport:
    """What `reconstruction_metrics` measures over a set of images."""

    psnr: float  # dB, mean over images (inf when every image is reconstructed exactly)
    ssim: float
    codebook_usage: float  # fraction of the codebook used
    codebook_perplexity: float  # effective number of codes


def reconstruction_report(originals: Images, reconstructions: Images, codes: torch.Tensor, codebook_size: int,
                          ssim_sigma: float = 1.5) -> ReconstructionReport:
    """PSNR and SSIM of ``reconstructions`` against ``originals``, codebook use of their ``codes``."""
    return ReconstructionReport(
        psnr=psnr(reconstructions, originals).item(),
        ssim=ssim(reconstructions, originals, sigma=ssim_sigma).item(),
        codebook_usage=codebook_usage(codes, codebook_size),
        codebook_perplexity=codebook_perplexity(codes, codebook_size),
    )


def reconstruction_metrics(
    tokenizer, images: Images, batch_size: int = 64, ssim_sigma: float = 1.5
) -> ReconstructionReport:
    """Encode and decode ``images`` with any image tokenizer (`VQGAN`, `PixelTokenizer`: their
    ``reconstruct``) and report reconstruction quality and codebook use."""
    pixels = as_pixels(images)
    codes, recon = tokenizer.reconstruct(pixels, batch_size)
    return reconstruction_report(pixels, recon, codes, tokenizer.codebook_size, ssim_sigma)


# ---------------------------------------------------------------- classifier-based metrics


def _in_eval_mode(fn: Callable) -> Callable:
    """Put a module (or the module a bound method belongs to) in eval mode; returns ``fn``."""
    owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        owner.eval()
    return fn


def _device_of(fn: Callable) -> torch.device:
    owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        param = next(owner.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


@torch.no_grad()
def _batched(fn: Callable, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = _device_of(fn)
    return torch.cat([fn(b.to(device)).float().cpu() for b in pixels.split(batch_size)])


@torch.no_grad()
def predict_labels(classifier: FeatureFn, images: Images, batch_size: int = 256) -> torch.Tensor:
    """Argmax class of ``classifier(pixels) -> logits [B, num_classes]``, as ``LongTensor[B]``."""
    logits = _batched(_in_eval_mode(classifier), as_pixels(images), batch_size)
    if logits.ndim != 2:
        raise ValueError(f"classifier must return logits [B, num_classes], got {tuple(logits.shape)}")
    return logits.argmax(-1)


def classifier_accuracy(
    classifier: FeatureFn, images: Images, labels: Sequence[int] | torch.Tensor, batch_size: int = 256
) -> float:
    """Fraction of ``images`` that ``classifier`` (pixels -> logits) assigns to ``labels``."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    preds = predict_labels(classifier, images, batch_size)
    if len(preds) != len(labels):
        raise ValueError(f"got {len(preds)} images but {len(labels)} labels")
    return (preds == labels).double().mean().item()


@dataclass
class PromptFidelity:
    """Text-to-image prompt fidelity: how often a generated image shows the class its prompt named."""

    accuracy: float  # over all generated images
    per_class: dict[int, float]  # prompt label -> accuracy on the images generated for it


def prompt_fidelity(
    classifier: FeatureFn, generated: Images, prompt_labels: Sequence[int] | torch.Tensor, batch_size: int = 256
) -> PromptFidelity:
    """Accuracy of ``classifier`` on images generated from prompts naming ``prompt_labels``.

    The classifier must be trained on real images and checked on real held-out ones first (its
    held-out accuracy is the ceiling this number can reach); it then judges generated images.
    """
    labels = torch.as_tensor(prompt_labels, dtype=torch.long)
    preds = predict_labels(classifier, generated, batch_size)
    if len(preds) != len(labels):
        raise ValueError(f"got {len(preds)} generated images but {len(labels)} prompt labels")
    hits = (preds == labels).double()
    per_class = {int(c): hits[labels == c].mean().item() for c in labels.unique()}
    return PromptFidelity(accuracy=hits.mean().item(), per_class=per_class)


@dataclass
class DiversityReport:
    """Within-class diversity of a set of images (e.g. several generations per prompt)."""

    per_class: dict[int, float]  # label -> mean pairwise Euclidean feature distance
    collapsed: list[int]  # labels whose mean distance is <= the collapse threshold
    mean: float  # mean of per_class


def per_class_diversity(
    images: Images,
    labels: Sequence[int] | torch.Tensor,
    feature_extractor: FeatureFn | None = None,
    collapse_threshold: float = 1e-6,
    batch_size: int = 256,
) -> DiversityReport:
    """Mean pairwise Euclidean distance between the features of images sharing a label.

    Features come from ``feature_extractor(pixels) -> [B, D]`` (e.g. a classifier's penultimate
    layer), or are the raw pixels when it is None. A class is flagged ``collapsed`` when its mean
    distance is at most ``collapse_threshold`` (identical images give exactly 0); compare with
    the same number on real images to judge partial collapse. Each label needs >= 2 images.
    """
    pixels = as_pixels(images)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(pixels) != len(labels):
        raise ValueError(f"got {len(pixels)} images but {len(labels)} labels")
    if feature_extractor is None:
        feats = pixels.double().flatten(1)
    else:
        feats = _batched(_in_eval_mode(feature_extractor), pixels, batch_size).double().flatten(1)
    per_class = {}
    for c in labels.unique().tolist():
        f = feats[labels == c]  # [n, D]
        n = len(f)
        if n < 2:
            raise ValueError(f"label {c} has {n} image; diversity needs at least 2 images per label")
        # Mean over the n(n-1) off-diagonal pairs (the diagonal distances are 0).
        per_class[int(c)] = (torch.cdist(f, f).sum() / (n * (n - 1))).item()
    collapsed = [c for c, d in per_class.items() if d <= collapse_threshold]
    return DiversityReport(per_class, collapsed, sum(per_class.values()) / len(per_class))


class _FeatureModule(torch.nn.Module):
    """Wraps a feature function for torchmetrics: no gradients, flat ``[B, D]`` output, and
    ``num_features`` set up front (else torchmetrics probes the network with a 299 px uint8 image)."""

    def __init__(self, fn: FeatureFn, num_features: int):
        super().__init__()
        self.fn = fn
        self.num_features = num_features

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float64 so the result torchmetrics casts back to this dtype keeps its precision
        return self.fn(x).flatten(1).double()


def fid(real: Images, fake: Images, feature_extractor: FeatureFn, batch_size: int = 256) -> float:
    """Fréchet distance between Gaussians fitted to the features of ``real`` and ``fake`` images.

    ``feature_extractor(pixels in [-1, 1]) -> [B, D]`` is any module or function, e.g. a
    classifier's penultimate layer trained on the same domain, or an Inception network when its
    pretrained weights are available; scores are only comparable under the same extractor.
    Computed by torchmetrics' ``FrechetInceptionDistance(feature=module)`` in float64; needs at
    least 2 images per set (and more than D for a well-conditioned covariance).
    """
    real_px, fake_px = as_pixels(real), as_pixels(fake)
    if len(real_px) < 2 or len(fake_px) < 2:
        raise ValueError(f"FID needs at least 2 real and 2 fake images, got {len(real_px)} and {len(fake_px)}")
    fn = _in_eval_mode(feature_extractor)
    device = _device_of(fn)
    with torch.no_grad():
        num_features = fn(real_px[:1].to(device)).flatten(1).shape[1]
    metric = FrechetInceptionDistance(feature=_FeatureModule(fn, num_features), reset_real_features=True)
    metric = metric.to(device)
    for pixels, is_real in ((real_px, True), (fake_px, False)):
        for batch in pixels.split(batch_size):
            metric.update(batch.to(device), real=is_real)
    return metric.compute().item()


# ---------------------------------------------------------------- image-to-text


def caption_accuracy(
    captions: Sequence[str], labels: Sequence[int] | torch.Tensor, parse: Callable[[str], int | None]
) -> float:
    """Fraction of generated ``captions`` from which ``parse`` reads back the true label.

    ``parse(caption) -> label or None`` (None: no class, or an ambiguous one, counts as wrong);
    e.g. ``label_from_caption`` of the digits example (examples/digits/digits.py).
    """
    labels = [int(x) for x in labels]
    if len(captions) != len(labels):
        raise ValueError(f"got {len(captions)} captions but {len(labels)} labels")
    if not labels:
        raise ValueError("got no captions")
    return sum(parse(c) == y for c, y in zip(captions, labels)) / len(labels)
