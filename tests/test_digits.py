"""The captioned digits data set and the digit classifier that judges generated images."""

import hashlib
from collections import Counter

import pytest
import torch
from digits import (
    DIGIT_WORDS,
    DigitClassifier,
    DigitClassifierConfig,
    caption_for,
    dataset_to_tensors,
    label_from_caption,
    load_digits_dataset,
)

from unimodal.evaluation.metrics import caption_accuracy, fid, per_class_diversity, prompt_fidelity


def test_captions_round_trip_and_parse_robustly():
    for label, word in enumerate(DIGIT_WORDS):
        assert caption_for(label) == f"a handwritten digit {word}"
        assert label_from_caption(caption_for(label)) == label
    assert label_from_caption("A Handwritten Digit SEVEN.") == 7
    assert label_from_caption("the digit 4") == 4
    assert label_from_caption("seven, yes: seven 7") == 7  # the same digit repeated
    assert label_from_caption("a handwritten digit") is None
    assert label_from_caption("a three or an eight") is None  # ambiguous
    assert label_from_caption("someone drew an 8x8 ninety") is None  # no whole-word digit
    with pytest.raises(ValueError, match="0..9"):
        caption_for(10)


def test_caption_accuracy_with_the_digit_parser():
    captions = ["a handwritten digit seven", "digit two", "a digit", "one and two"]
    assert caption_accuracy(captions, [7, 3, 0, 1], label_from_caption) == 0.25


def _image_hashes(ds):
    return [hashlib.sha1(img.tobytes()).hexdigest() for img in ds["image"]]


@pytest.fixture(scope="module")
def splits():
    return load_digits_dataset(split="train"), load_digits_dataset(split="test")


def test_dataset_columns_sizes_and_captions(splits):
    train, test = splits
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert set(train.column_names) == {"image", "caption", "label"}
    assert train.features["label"].names == list(DIGIT_WORDS)
    row = test[0]
    assert row["image"].mode == "RGB" and row["image"].size == (32, 32)
    assert all(caption_for(y) == c for y, c in zip(train["label"], train["caption"]))
    # stratified: each digit is ~1/10 of the test split
    assert all(34 <= n <= 38 for n in Counter(test["label"]).values())
    # white digit on a black background
    pixels, _ = dataset_to_tensors(test)
    assert pixels.shape == (360, 3, 32, 32)
    assert (pixels < -0.9).float().mean() > 0.3 and pixels.amax(dim=(1, 2, 3)).min() > 0.5


def test_split_is_deterministic_and_a_partition(splits):
    train, test = splits
    assert _image_hashes(load_digits_dataset(split="test")) == _image_hashes(test)
    everything = load_digits_dataset(split="all")
    assert sorted(_image_hashes(train) + _image_hashes(test)) == sorted(_image_hashes(everything))
    other = load_digits_dataset(split="test", seed=1)
    assert _image_hashes(other) != _image_hashes(test)


def test_dataset_size_option_and_bad_split():
    small = load_digits_dataset(image_size=16, split="test", test_fraction=0.1)
    assert len(small) == 180 and small[0]["image"].size == (16, 16)
    with pytest.raises(ValueError, match="split"):
        load_digits_dataset(split="validation")


@pytest.fixture(scope="module")
def trained(splits):
    torch.manual_seed(0)
    clf = DigitClassifier()
    losses = clf.fit(splits[0])
    return clf, losses


def test_classifier_reaches_high_held_out_accuracy(trained, splits):
    clf, losses = trained
    assert losses[-1] < losses[0] / 4
    pixels, labels = dataset_to_tensors(splits[1])
    accuracy = (clf.predict(pixels) == labels).float().mean().item()
    assert accuracy >= 0.97
    assert clf.features(pixels[:5]).shape == (5, clf.num_features)


def test_classifier_save_load_round_trip(trained, splits, tmp_path):
    clf, _ = trained
    clf.save(tmp_path / "clf")
    loaded = DigitClassifier.load(tmp_path / "clf")
    pixels, _ = dataset_to_tensors(splits[1].select(range(8)))
    torch.testing.assert_close(loaded(pixels), clf(pixels))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        DigitClassifier.load(tmp_path / "missing")


def test_classifier_input_checks_and_fit_on_tensors():
    clf = DigitClassifier(DigitClassifierConfig(image_size=16, width=4))
    with pytest.raises(ValueError, match="16x16"):
        clf(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="labels="):
        clf.fit(torch.zeros(4, 3, 16, 16))
    pixels = torch.rand(8, 3, 16, 16) * 2 - 1
    before = [p.clone() for p in clf.parameters()]
    losses = clf.fit(pixels, labels=[0, 1] * 4, epochs=1, batch_size=4)
    assert len(losses) == 1 and not clf.training
    assert any(not torch.equal(a, b) for a, b in zip(before, clf.parameters()))


def test_digit_metrics_with_classifier_features(trained, splits):
    clf, _ = trained
    train, test = splits
    real, labels = dataset_to_tensors(test)
    other_real, _ = dataset_to_tensors(train.select(range(360)))

    # prompt fidelity: real images of the prompted digit score like the classifier; wrong ones fail
    assert prompt_fidelity(clf, real, labels).accuracy >= 0.97
    assert prompt_fidelity(clf, real, (labels + 1) % 10).accuracy < 0.05

    # FID on classifier features: another real sample is close, noise and blurred digits are far
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(real, 5, stride=1, padding=2)
    near = fid(real, other_real, clf.features)
    assert abs(fid(real, real, clf.features)) < 1e-3
    assert near < fid(real, blurred, clf.features) < fid(real, noise, clf.features)

    # diversity: real digits vary; one image per digit repeated is flagged as collapsed
    assert per_class_diversity(real, labels, clf.features).collapsed == []
    firsts = torch.stack([real[labels == d][0] for d in range(10)]).repeat_interleave(4, 0)
    collapsed = per_class_diversity(firsts, torch.arange(10).repeat_interleave(4), clf.features)
    assert collapsed.collapsed == list(range(10))
