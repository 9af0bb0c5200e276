"""Image data for training image tokenizers: robust loading, crop policy, three sources.

Every dataset here yields ``[3, S, S]`` float tensors in ``[-1, 1]`` (``S = policy.image_size``):

- `ImageFolderDataset`: image files under a folder (recursively);
- `HFImageDataset`: a ``datasets.Dataset`` with an image column;
- `ShippedCrops`: the default that needs no download, random crops of the photographs that ship
  inside scikit-learn and scikit-image, with a fixed held-out region of every photo.

Odd modes (greyscale, RGBA, CMYK, 16-bit, palette) are converted by `unimodal.images.to_rgb`.
Unreadable or corrupt images are found by decoding every image once when the dataset is built:
they are skipped, counted (``dataset.skipped``) and reported in one warning, or raise
`CorruptImageError` with ``strict=True``. Checking up front (not on first use) keeps every
process of a multi-process run on the same list of images, and a strict run fails before training.
"""

from __future__ import annotations

import os
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import center_square, crop_resize, open_image, to_pixels, to_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Photographs that load offline (scikit-learn's sample images, scikit-image's bundled data);
# greyscale ones become grey RGB. Synthetic images (logo, colour wheel, checkerboard) are left out.
SHIPPED_IMAGES = (
    "china", "flower", "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
    "immunohistochemistry", "retina", "motorcycle", "camera", "coins", "moon", "grass",
    "gravel", "brick", "clock", "cell",
)


class CorruptImageError(ValueError):
    """An image could not be decoded and the dataset was built with ``strict=True``."""


@dataclass
class CropPolicy:
    """How a source image of any size becomes an ``image_size x image_size`` example.

    A square of side ``scale * min(width, height)`` is cut out, ``scale`` drawn uniformly from
    ``[min_scale, max_scale]`` at a random position (``random=True``, training) or taken from
    the centre at ``max_scale`` (``random=False``, evaluation), then resized to ``image_size``.
    ``min_scale = max_scale = 1`` is the usual "resize the shorter side, then crop"; smaller
    scales zoom in (the shipped photos are 300-1400 px, so 32 px training crops use ~0.1-0.4).
    """

    image_size: int
    random: bool = True
    min_scale: float = 1.0
    max_scale: float = 1.0
    flip: bool = False  # random horizontal flip (training only)

    def __post_init__(self):
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise ValueError(
                f"need 0 < min_scale <= max_scale <= 1, got min_scale={self.min_scale}, max_scale={self.max_scale}"
            )

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> Image.Image:
        """Crop and resize an RGB image; ``rng`` makes the random choices reproducible."""
        rng = rng if rng is not None else np.random.default_rng(int(torch.randint(2**31, ())))
        w, h = image.size
        if not self.random:
            left, top, side = center_square(w, h, self.max_scale)
        else:
            side = max(1, round(rng.uniform(self.min_scale, self.max_scale) * min(w, h)))
            left, top = int(rng.integers(w - side + 1)), int(rng.integers(h - side + 1))
        image = crop_resize(image, left, top, side, self.image_size)
        if self.random and self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


def _report_skipped(skipped: list[tuple[str, str]], total: int, strict: bool, what: str) -> None:
    if not skipped:
        return
    listing = "; ".join(f"{name}: {reason}" for name, reason in skipped[:5])
    more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
    if strict:
        raise CorruptImageError(
            f"{len(skipped)} of {total} {what} could not be read: {listing}{more}. "
            "Remove or fix them, or pass strict=False (recipe: --strict false) to skip them."
        )
    warnings.warn(f"skipped {len(skipped)} of {total} unreadable {what}: {listing}{more}", stacklevel=3)


class _CheckedImages(Dataset):
    """Items that decoded at construction time; subclasses say how to read item ``i``."""

    def __init__(self, read: Callable[[int], Image.Image], names: list[str], policy: CropPolicy,
                 strict: bool, what: str):
        self.policy = policy
        self.keep: list[int] = []  # indices into the source that decode
        self.skipped: list[tuple[str, str]] = []  # (name, error) of those that do not
        for i, name in enumerate(names):
            try:
                read(i)
                self.keep.append(i)
            except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError...)
                self.skipped.append((name, f"{type(err).__name__}: {err}"))
        _report_skipped(self.skipped, len(names), strict, what)
        if not self.keep:
            raise ValueError(f"no readable {what} found (all {len(names)} failed to decode)")
        self._read = read

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_pixels(self.policy(self._read(self.keep[i])))


class ImageFolderDataset(_CheckedImages):
    """Every image file under ``root`` (recursively, sorted), cropped by ``policy``.

    ``split="train"``/``"eval"`` with ``eval_fraction > 0`` keeps a fixed held-out set: a file is
    held out when a hash of its relative path says so, so adding files never moves old ones
    between the splits. ``split=None`` takes every file. ``files`` lists every candidate file,
    ``keep`` the indices of the readable ones, ``skipped`` the others with their errors.
    """

    def __init__(self, root: str | os.PathLike, policy: CropPolicy, split: str | None = None,
                 eval_fraction: float = 0.0, strict: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if split is not None:
            if split not in ("train", "eval"):
                raise ValueError(f"split must be 'train', 'eval' or None, got {split!r}")
            files = [p for p in files if _held_out(str(p.relative_to(self.root)), eval_fraction) == (split == "eval")]
        if not files:
            raise ValueError(
                f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}"
                + (f" for split {split!r} (eval_fraction={eval_fraction})" if split else "")
            )
        self.files = files
        super().__init__(lambda i: open_image(self.files[i]), [str(p) for p in files], policy, strict, "image files")


def _held_out(name: str, fraction: float) -> bool:
    return zlib.crc32(name.encode()) % 10_000 < fraction * 10_000


class HFImageDataset(_CheckedImages):
    """A ``datasets.Dataset`` with an image column (``datasets.Image`` feature or raw bytes/paths)."""

    def __init__(self, dataset, policy: CropPolicy, image_column: str = "image", strict: bool = False):
        from datasets import Image as ImageFeature

        if image_column not in dataset.column_names:
            raise ValueError(f"dataset has no column {image_column!r}; columns: {dataset.column_names}")
        if isinstance(dataset.features[image_column], ImageFeature):
            # Read the encoded bytes ourselves so a corrupt image is skipped, not raised by datasets.
            dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
        self.dataset = dataset.select_columns([image_column])
        self.image_column = image_column
        super().__init__(self._read_row, [f"row {i}" for i in range(len(dataset))], policy, strict, "images")

    def _read_row(self, i: int) -> Image.Image:
        return open_image(self.dataset[i][self.image_column])


@lru_cache(maxsize=1)
def load_shipped_images() -> dict[str, Image.Image]:
    """The `SHIPPED_IMAGES` photographs as RGB PIL images (no network; cached per process)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    arrays = {Path(f).stem: a for f, a in zip(sample.filenames, sample.images)}
    for name in SHIPPED_IMAGES:
        if name not in arrays:
            arrays[name] = (skimage.data.stereo_motorcycle()[0] if name == "motorcycle"
                            else getattr(skimage.data, name)())
    return {name: to_rgb(Image.fromarray(arrays[name])) for name in SHIPPED_IMAGES}


class ShippedCrops(Dataset):
    """``num_samples`` crops of the shipped photos: the default data, no download needed.

    Each photo is split once: the right ``holdout_fraction`` of its width is kept for
    ``split="eval"``, the rest for ``split="train"``, so held-out crops share no pixel with
    training crops. Crop ``i`` (photo, position, scale, flip) depends only on ``(seed, split, i)``:
    every process, every resumed run and every benchmark variant sees the same data.
    """

    def __init__(self, policy: CropPolicy, split: str = "train", num_samples: int = 20_000,
                 holdout_fraction: float = 0.25, seed: int = 0):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if not 0 < holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        self.policy, self.split, self.num_samples, self.seed = policy, split, num_samples, seed
        self.regions = []
        for image in load_shipped_images().values():
            w, h = image.size
            cut = round(w * (1 - holdout_fraction))
            self.regions.append(image.crop((0, 0, cut, h)) if split == "train" else image.crop((cut, 0, w, h)))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        rng = np.random.default_rng((self.seed, self.split == "eval", i))
        region = self.regions[int(rng.integers(len(self.regions)))]
        return to_pixels(self.policy(region, rng))


ImageDataset = ShippedCrops | ImageFolderDataset | HFImageDataset  # what load_image_dataset returns


def load_image_dataset(source: str | None, policy: CropPolicy, split: str, *, image_column: str = "image",
                       eval_fraction: float = 0.05, num_samples: int = 20_000, strict: bool = False,
                       seed: int = 0) -> ImageDataset:
    """One entry point for the recipe: ``split`` is ``"train"`` or ``"eval"``.

    ``source`` is None or ``"shipped"`` (`ShippedCrops`), a folder of image files
    (`ImageFolderDataset`, hashed held-out split), a folder written by ``Dataset.save_to_disk``,
    or a Hub dataset name (`HFImageDataset`; its ``test``/``validation`` split is the held-out
    set when it has one, else a seeded ``eval_fraction`` of ``train``).
    """
    if source in (None, "", "shipped"):
        return ShippedCrops(policy, split, num_samples, seed=seed)
    path = Path(source)
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        return ImageFolderDataset(path, policy, split, eval_fraction, strict)
    import datasets

    data = datasets.load_from_disk(source) if path.is_dir() else datasets.load_dataset(source)
    if isinstance(data, datasets.DatasetDict):
        held = next((s for s in ("test", "validation") if s in data), None)
        if held is not None:
            return HFImageDataset(data["train" if split == "train" else held], policy, image_column, strict)
        data = data["train"] if "train" in data else next(iter(data.values()))
    parts = data.train_test_split(test_size=eval_fraction, seed=seed)
    return HFImageDataset(parts["train" if split == "train" else "test"], policy, image_column, strict)


@dataclass
class ImageDataArguments:
    """Where training images come from and how they are cropped (a recipe config section).

    Args:
        data: ``"shipped"`` (crops of the photos inside scikit-learn / scikit-image), a folder of
            image files, a ``save_to_disk`` folder, or a Hub dataset name.
        image_column: the image column of a ``datasets`` source.
        image_size: side of the training crops; must be a multiple of the downsample factor.
        min_scale: smallest crop side, as a fraction of the image's shorter side.
        max_scale: largest crop side (held-out crops of folders / datasets are centred at this scale).
        flip: random horizontal flips of training crops.
        eval_fraction: held-out share of a folder / dataset without its own test split.
        train_samples: crops per epoch of the shipped photos.
        eval_samples: held-out images evaluated (the first ones of the held-out split).
        strict: fail on unreadable images instead of skipping them with a warning.
    """

    data: str = "shipped"
    image_column: str = "image"
    image_size: int = 32
    min_scale: float = 0.1
    max_scale: float = 0.4
    flip: bool = True
    eval_fraction: float = 0.05
    train_samples: int = 20_000
    eval_samples: int = 256
    strict: bool = False


def load_image_datasets(args: ImageDataArguments, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """The training dataset (random crops) and the held-out dataset (fixed crops).

    Held-out crops are fixed: centred for folders and ``datasets`` sources, seeded positions
    inside the held-out region for the shipped photos (their centres would repeat per photo).
    """
    shipped = args.data in ("", "shipped")
    train_policy = CropPolicy(args.image_size, True, args.min_scale, args.max_scale, args.flip)
    eval_policy = CropPolicy(args.image_size, shipped, args.min_scale, args.max_scale, flip=False)
    common: dict[str, Any] = dict(image_column=args.image_column, eval_fraction=args.eval_fraction,
                                  strict=args.strict, seed=seed)
    train = load_image_dataset(args.data, train_policy, "train", num_samples=args.train_samples, **common)
    held = load_image_dataset(args.data, eval_policy, "eval", num_samples=args.eval_samples, **common)
    return train, held
