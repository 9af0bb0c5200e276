"""Captioned handwritten digits: the demo's data set, and a classifier to judge its generations.

Part of the digits example, not of the library: ``run.py`` imports it as a sibling module, the
tests through pytest's ``pythonpath`` (pyproject.toml), the benchmarks by putting this folder on
``sys.path``. The images are scikit-learn's ``load_digits`` (1797 greyscale 8x8 scans, shipped
with the package, so nothing is downloaded), upsampled to ``image_size`` and stored as RGB with a white
digit on black, captioned ``"a handwritten digit seven"``. `DigitClassifier` is a small CNN
trained on the train split; on generated images it measures prompt fidelity, and its
penultimate layer is the feature space for FID and diversity (see `unimodal.evaluation.metrics`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from unimodal.images import pil_to_tensor

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_PREFIX = "a handwritten digit"

# A digit word or a lone numeral, as a whole word ("someone" and "8x8" do not count).
_DIGIT_RE = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|\d)\b", re.IGNORECASE)


def caption_for(label: int) -> str:
    """``7 -> "a handwritten digit seven"``."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"digit label must be in 0..9, got {label}")
    return f"{CAPTION_PREFIX} {DIGIT_WORDS[int(label)]}"


def label_from_caption(text: str) -> int | None:
    """The digit a caption names, from a digit word or numeral (case-insensitive).

    Returns None when the caption names no digit or names two different ones (ambiguous);
    repeating the same digit ("seven seven") is fine.
    """
    found = {
        int(m) if m.isdigit() else DIGIT_WORDS.index(m.lower())
        for m in _DIGIT_RE.findall(text)
    }
    return found.pop() if len(found) == 1 else None


@lru_cache(maxsize=8)
def _digit_arrays(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 ``[N, S, S]`` (ink = 255) and their labels ``[N]``."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    # 0..16 ink levels -> 0..255, then a smooth (bicubic) upsample so the digits are not blocky.
    small = np.clip(raw.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)  # [N, 8, 8]
    big = np.stack([
        np.asarray(Image.fromarray(a, mode="L").resize((image_size, image_size), Image.BICUBIC))
        for a in small
    ])
    return big, raw.target.astype(np.int64)


def load_digits_dataset(
    image_size: int = 32, split: str = "train", test_fraction: float = 0.2, seed: int = 0
) -> datasets.Dataset:
    """Captioned digits as a `datasets.Dataset` with columns ``image`` (RGB), ``caption``, ``label``.

    The split is stratified by label and fixed by ``seed``: the same arguments always give the
    same rows, and train/test never share an image. ``split="all"`` returns all 1797 digits.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    images, labels = _digit_arrays(int(image_size))
    index = np.arange(len(labels))
    if split != "all":
        from sklearn.model_selection import train_test_split

        train_idx, test_idx = train_test_split(
            index, test_size=test_fraction, random_state=seed, stratify=labels
        )
        index = np.sort(train_idx if split == "train" else test_idx)
    features = datasets.Features({
        "image": datasets.Image(),
        "caption": datasets.Value("string"),
        "label": datasets.ClassLabel(names=list(DIGIT_WORDS)),
    })
    return datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(images[i], mode="L").convert("RGB") for i in index],
            "caption": [caption_for(labels[i]) for i in index],
            "label": labels[index].tolist(),
        },
        features=features,
    )


def save_splits(output_dir: str | Path, image_size: int = 32, seed: int = 0) -> dict[str, Path]:
    """Write the train and test splits as ``save_to_disk`` folders ``output_dir/{train,test}``:
    data every recipe reads like any user's (``tokenize_dataset.py --source output_dir/train``,
    ``train_tokenizer.py --data output_dir/train``)."""
    paths = {split: Path(output_dir) / split for split in ("train", "test")}
    for split, path in paths.items():
        load_digits_dataset(image_size, split, seed=seed).save_to_disk(str(path))
    return paths


def dataset_to_tensors(dataset: datasets.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """``image``/``label`` columns -> pixels ``[N, 3, S, S]`` in [-1, 1] and labels ``LongTensor[N]``."""
    return pil_to_tensor(dataset["image"]), torch.tensor(dataset["label"], dtype=torch.long)


@dataclass
class DigitClassifierConfig:
    """Architecture of `DigitClassifier`."""

    image_size: int = 32  # side of the input images; other sizes are refused
    width: int = 32  # channels of the first conv block (doubled twice)
    # Inputs are area-downsampled to this side first: the digits are 8x8 scans, so 16 px keeps
    # all they carry (and a stroke-level view of generated images) at a quarter of the compute.
    work_size: int = 16
    num_classes: int = 10


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random small rotation, scale and shift of ``[B, 3, S, S]`` digits on a black background,
    so the classifier judges the digit, not its exact placement."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=generator) - 0.5) * (2 * 0.2)  # +-0.2 rad
    scale = 1 + (torch.rand(b, generator=generator) - 0.5) * 0.2  # 0.9..1.1
    shift = (torch.rand(b, 2, generator=generator) - 0.5) * 0.25  # +-1/8 of the side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample pads with 0, so sample in [0, 2] (black = 0) and shift back to [-1, 1].
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


class DigitClassifier(nn.Module):
    """A small CNN: pixels ``[B, 3, S, S]`` in [-1, 1] -> logits ``[B, 10]``.

    Area-downsample to ``T = min(S, work_size)``, three conv blocks (``T -> T/2 -> T/4``), global
    average pooling to a ``4 * width`` feature vector (`features`, used for FID and diversity),
    and a linear head.
    """

    def __init__(self, config: DigitClassifierConfig | None = None):
        super().__init__()
        self.config = config or DigitClassifierConfig()
        w = self.config.width

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        t = min(self.config.image_size, self.config.work_size)
        self.body = nn.Sequential(
            nn.AdaptiveAvgPool2d(t),  # [B, 3, T, T]
            block(3, w), nn.MaxPool2d(2),  # [B, w, T/2, T/2]
            block(w, 2 * w), nn.MaxPool2d(2),  # [B, 2w, T/4, T/4]
            block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # [B, 4w]
        )
        self.head = nn.Linear(4 * w, self.config.num_classes)

    @property
    def num_features(self) -> int:
        return 4 * self.config.width

    def _check(self, pixels: torch.Tensor) -> None:
        s = self.config.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(
                f"DigitClassifier expects pixels [B, 3, {s}, {s}] in [-1, 1], got {tuple(pixels.shape)}; "
                f"resize the images to {s}x{s} or train a classifier for their size"
            )

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features ``[B, 4 * width]``."""
        self._check(pixels)
        return self.body(pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self.head(self.features(pixels))

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Predicted labels ``LongTensor[B]`` (runs in eval mode)."""
        self.eval()
        return torch.cat([self(b).argmax(-1) for b in pixels.split(batch_size)])

    def fit(
        self,
        data: datasets.Dataset | torch.Tensor | Sequence[Image.Image],
        labels: Sequence[int] | torch.Tensor | None = None,
        epochs: int = 8,
        batch_size: int = 128,
        lr: float = 1e-2,
        augment: bool = True,
        seed: int = 0,
    ) -> list[float]:
        """Train on a dataset with ``image``/``label`` columns, or on pixels / PIL images + ``labels``.

        AdamW with a one-cycle learning-rate schedule; returns the mean training loss of each
        epoch. Leaves the model in eval mode.
        """
        if isinstance(data, datasets.Dataset):
            if labels is not None:
                raise ValueError("pass labels only with images; a dataset brings its own 'label' column")
            pixels, targets = dataset_to_tensors(data)
        else:
            if labels is None:
                raise ValueError("pass labels= when training on images instead of a dataset")
            pixels = data if isinstance(data, torch.Tensor) else pil_to_tensor(list(data))
            targets = torch.as_tensor(labels, dtype=torch.long)
        if len(pixels) != len(targets):
            raise ValueError(f"got {len(pixels)} images but {len(targets)} labels")
        self._check(pixels)

        generator = torch.Generator().manual_seed(seed)
        steps_per_epoch = -(-len(pixels) // batch_size)
        optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch)
        device = next(self.parameters()).device
        self.train()
        losses = []
        for _ in range(epochs):
            order = torch.randperm(len(pixels), generator=generator)
            total = 0.0
            for idx in order.split(batch_size):
                x = pixels[idx]
                if augment:
                    x = _augment(x, generator)
                loss = F.cross_entropy(self(x.to(device)), targets[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(idx)
            losses.append(total / len(pixels))
        self.eval()
        return losses

    def save(self, path: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into the folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path / "model.safetensors")

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> DigitClassifier:
        """Load a classifier written by `save` (in eval mode)."""
        path = Path(path)
        if not (path / "model.safetensors").exists():
            raise FileNotFoundError(f"no DigitClassifier at {path}: expected config.json and model.safetensors")
        model = cls(DigitClassifierConfig(**json.loads((path / "config.json").read_text())))
        model.load_state_dict(load_file(path / "model.safetensors", device=str(device)))
        return model.to(device).eval()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the captioned digits as save_to_disk folders.")
    parser.add_argument("output_dir", help="gets train/ and test/ (e.g. outputs/digits)")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    for split, path in save_splits(cli.output_dir, cli.image_size, cli.seed).items():
        print(f"{split}: {path}")
