"""Image loading for tokenizer training: odd modes converted, corrupt files skipped or fatal,
crop policy, the shipped default with its held-out region, and the source dispatch."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from unimodal.image_data import (
    CorruptImageError,
    CropPolicy,
    HFImageDataset,
    ImageFolderDataset,
    ShippedCrops,
    load_image_dataset,
    load_shipped_images,
)


def _value(t: torch.Tensor) -> list[int]:
    """The RGB value (0-255) of a uniform [3, S, S] tensor in [-1, 1]."""
    assert torch.allclose(t, t[:, :1, :1].expand_as(t), atol=1e-6), "expected a uniform image"
    return [round((v + 1) * 127.5) for v in t[:, 0, 0].tolist()]


def _odd_images(root):
    """One uniform 12x12 image per awkward mode, with the RGB it must become."""
    expected = {}
    Image.new("L", (12, 12), 100).save(root / "grey.png")
    expected["grey.png"] = [100, 100, 100]
    rgba = Image.new("RGBA", (12, 12), (255, 0, 0, 0))  # fully transparent red -> the white background
    rgba.save(root / "transparent.png")
    expected["transparent.png"] = [255, 255, 255]
    Image.new("RGBA", (12, 12), (0, 0, 255, 255)).save(root / "opaque.png")
    expected["opaque.png"] = [0, 0, 255]
    Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(root / "cmyk.tif")
    expected["cmyk.tif"] = [255, 0, 0]
    Image.fromarray(np.full((12, 12), 65535, np.uint16)).save(root / "white16.png")  # mode I;16
    expected["white16.png"] = [255, 255, 255]
    Image.fromarray(np.full((12, 12), 32768, np.uint16)).save(root / "grey16.png")
    expected["grey16.png"] = [128, 128, 128]
    pal = Image.new("P", (12, 12), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(root / "palette.png")
    expected["palette.png"] = [10, 200, 30]
    pal_t = Image.new("P", (12, 12), 0)
    pal_t.putpalette([0, 0, 0] * 256)
    pal_t.save(root / "palette_transparent.png", transparency=0)
    expected["palette_transparent.png"] = [255, 255, 255]
    return expected


def test_odd_modes_are_converted_to_rgb(tmp_path):
    expected = _odd_images(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here is corrupt: no skip warning
        ds = ImageFolderDataset(tmp_path, CropPolicy(8, random=False))
    assert len(ds) == len(expected) and ds.skipped == []
    got = {p.name: _value(ds[i]) for i, p in enumerate(ds.files)}
    for name, rgb in expected.items():
        assert got[name] == pytest.approx(rgb, abs=1), name
    assert ds[0].shape == (3, 8, 8) and ds[0].dtype == torch.float32


def _corrupt_files(root):
    Image.new("RGB", (16, 16), (10, 20, 30)).save(root / "good.png")
    Image.new("RGB", (16, 16), (40, 50, 60)).save(root / "sub_good.jpg")
    full = (root / "sub_good.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "not_an_image.png").write_text("hello, I am text")
    (root / "empty.webp").write_bytes(b"")
    (root / "notes.txt").write_text("ignored: not an image extension")


def test_corrupt_files_are_skipped_counted_and_warned(tmp_path):
    _corrupt_files(tmp_path)
    with pytest.warns(UserWarning, match="skipped 3 of 5 unreadable image files") as record:
        ds = ImageFolderDataset(tmp_path, CropPolicy(8))
    assert len(record) == 1
    assert len(ds) == 2 and sorted(ds.files[i].name for i in ds.keep) == ["good.png", "sub_good.jpg"]
    assert sorted(name.rsplit("/", 1)[-1] for name, _ in ds.skipped) == ["empty.webp", "not_an_image.png",
                                                                         "truncated.jpg"]
    assert torch.stack([ds[0], ds[1]]).shape == (2, 3, 8, 8)


def test_strict_makes_corrupt_files_fatal(tmp_path):
    _corrupt_files(tmp_path)
    with pytest.raises(CorruptImageError, match="3 of 5 image files could not be read.*strict=False"):
        ImageFolderDataset(tmp_path, CropPolicy(8), strict=True)


def test_all_corrupt_or_empty_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderDataset(tmp_path, CropPolicy(8))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG nope")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no readable image files"):
        ImageFolderDataset(tmp_path, CropPolicy(8))


def test_hf_dataset_with_image_column_skips_corrupt_rows(tmp_path):
    import datasets

    _odd_images(tmp_path)
    paths = sorted(str(p) for p in tmp_path.iterdir())
    data = datasets.Dataset.from_dict({"image": paths, "label": list(range(len(paths)))})
    data = data.cast_column("image", datasets.Image())
    ds = HFImageDataset(data, CropPolicy(8, random=False))
    assert len(ds) == len(paths) and ds[0].shape == (3, 8, 8)
    rows = [{"bytes": (tmp_path / "grey.png").read_bytes(), "path": None}, {"bytes": b"garbage", "path": None}]
    bad = datasets.Dataset.from_dict({"img": rows}).cast_column("img", datasets.Image())
    with pytest.warns(UserWarning, match="skipped 1 of 2 unreadable images: row 1"):
        ds = HFImageDataset(bad, CropPolicy(8, random=False), image_column="img")
    assert len(ds) == 1 and _value(ds[0]) == [100, 100, 100]
    with pytest.raises(CorruptImageError):
        HFImageDataset(bad, CropPolicy(8), image_column="img", strict=True)
    with pytest.raises(ValueError, match="no column 'image'"):
        HFImageDataset(bad, CropPolicy(8))


def test_crop_policy():
    # Left half black, right half white: a centre crop at scale 1 of a 40x20 image sees both.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 20:] = 255
    image = Image.fromarray(arr)
    centre = CropPolicy(10, random=False)(image)
    assert centre.size == (10, 10)
    assert np.asarray(centre)[:, 0].max() < 10 and np.asarray(centre)[:, -1].min() > 245
    # Random positions differ between draws but repeat for the same generator seed.
    policy = CropPolicy(4, min_scale=0.1, max_scale=0.2)
    crops = [np.asarray(policy(image, np.random.default_rng(s))) for s in range(20)]
    assert len({c.tobytes() for c in crops}) > 2
    assert np.array_equal(crops[3], np.asarray(policy(image, np.random.default_rng(3))))
    # Flips: a square image cropped whole at scale 1 keeps its black left column unless flipped.
    square = Image.fromarray(np.ascontiguousarray(arr[:, 10:30]))

    def left_is_white(policy, seed):
        return np.asarray(policy(square, np.random.default_rng(seed)))[:, 0].mean() > 128

    assert {left_is_white(CropPolicy(20, flip=True), s) for s in range(20)} == {True, False}
    assert {left_is_white(CropPolicy(20), s) for s in range(20)} == {False}
    assert {left_is_white(CropPolicy(20, random=False, flip=True), s) for s in range(20)} == {False}
    with pytest.raises(ValueError, match="min_scale <= max_scale"):
        CropPolicy(8, min_scale=0.5, max_scale=0.2)


def test_shipped_crops_are_deterministic_and_held_out():
    photos = load_shipped_images()
    assert len(photos) >= 15 and all(p.mode == "RGB" for p in photos.values())
    policy = CropPolicy(16, min_scale=0.1, max_scale=0.3, flip=True)
    train, held = ShippedCrops(policy, "train", 50), ShippedCrops(policy, "eval", 50)
    assert len(train) == 50 and train[7].shape == (3, 16, 16)
    assert train[7].min() >= -1 and train[7].max() <= 1
    assert torch.equal(train[7], ShippedCrops(policy, "train", 50)[7])  # same crop in every process
    assert not torch.equal(train[7], train[8]) and not torch.equal(train[7], held[7])
    # The two regions of each photo tile it without overlap.
    for full, a, b in zip(photos.values(), train.regions, held.regions):
        assert a.size[0] + b.size[0] == full.size[0] and a.size[1] == b.size[1] == full.size[1]
        assert a.size[0] > 2 * b.size[0]
    with pytest.raises(IndexError):
        train[50]


def test_load_image_dataset_dispatch(tmp_path):
    import datasets

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(40):
        Image.new("RGB", (10, 10), (i, i, i)).save(folder / f"{i:02d}.png")
    policy = CropPolicy(8, random=False)
    train = load_image_dataset(str(folder), policy, "train", eval_fraction=0.25)
    held = load_image_dataset(str(folder), policy, "eval", eval_fraction=0.25)
    assert set(train.files).isdisjoint(held.files) and len(train) + len(held) == 40 and 3 <= len(held) <= 18
    assert isinstance(load_image_dataset(None, policy, "eval", num_samples=5), ShippedCrops)
    saved = tmp_path / "saved"
    data = datasets.Dataset.from_dict({"image": [str(p) for p in sorted(folder.iterdir())]})
    data.cast_column("image", datasets.Image()).save_to_disk(str(saved))
    hf_train = load_image_dataset(str(saved), policy, "train", eval_fraction=0.25)
    hf_eval = load_image_dataset(str(saved), policy, "eval", eval_fraction=0.25)
    assert (len(hf_train), len(hf_eval)) == (30, 10)
