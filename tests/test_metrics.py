"""unimodal.evaluation.metrics returns known values on constructed inputs and matches reference implementations."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from unimodal.evaluation.metrics import (
    caption_accuracy,
    classifier_accuracy,
    codebook_perplexity,
    codebook_usage,
    fid,
    per_class_diversity,
    prompt_fidelity,
    psnr,
    reconstruction_metrics,
    ssim,
)
from unimodal.images import tensor_to_pil, to_pixels


def rand_pixels(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- PSNR / SSIM


def test_psnr_of_identical_images_is_inf():
    x = rand_pixels(3, 3, 8, 8)
    assert torch.isinf(psnr(x, x))
    assert torch.isinf(psnr(x, x, reduction="none")).all()


def test_psnr_of_known_mse_matches_the_formula():
    x = rand_pixels(2, 3, 8, 8) * 0.5
    # image 0 off by a constant 0.1 (MSE 0.01); image 1 by 0.2 (MSE 0.04); data range is 2
    y = x + torch.tensor([0.1, 0.2]).view(2, 1, 1, 1)
    per_image = psnr(y, x, reduction="none")
    expected = torch.tensor([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.04)], dtype=torch.float64)
    torch.testing.assert_close(per_image, expected)
    torch.testing.assert_close(psnr(y, x), expected.mean())
    # random noise: compare with the per-image MSE computed by hand
    z = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    by_hand = [10 * math.log10(4 / ((z[i].double() - x[i].double()) ** 2).mean().item()) for i in range(2)]
    assert psnr(z, x, reduction="none").tolist() == pytest.approx(by_hand)


def test_psnr_accepts_pil_images_and_rejects_mismatched_shapes():
    x = rand_pixels(2, 3, 8, 8)
    pil = tensor_to_pil(x)
    assert torch.isinf(psnr(pil, pil))
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:, :, :4])


def astronaut_crop() -> torch.Tensor:
    """A 64x64 crop of scikit-image's astronaut photo, ``[3, 64, 64]`` in [-1, 1]."""
    from skimage import data

    return to_pixels(Image.fromarray(data.astronaut()[100:164, 150:214]))


def _skimage_ssim(a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5) -> float:
    return structural_similarity(
        a.double().numpy(), b.double().numpy(), data_range=2.0, channel_axis=0,
        gaussian_weights=True, sigma=sigma, use_sample_covariance=False,
    )


def test_ssim_matches_skimage_on_random_images():
    x, y = rand_pixels(2, 3, 32, 24, seed=0), rand_pixels(2, 3, 32, 24, seed=1)
    y = 0.5 * x + 0.5 * y  # correlated, so SSIM is neither ~0 nor 1
    ours = ssim(x, y, reduction="none")
    ref = torch.tensor([_skimage_ssim(x[i], y[i]) for i in range(2)], dtype=torch.float64)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert 0.2 < ours.mean() < 0.9


def test_ssim_of_a_large_batch_is_computed_in_chunks_with_the_same_values(monkeypatch):
    import unimodal.evaluation.metrics as metrics

    x, y = rand_pixels(7, 3, 16, 16, seed=2), rand_pixels(7, 3, 16, 16, seed=3)
    y = 0.5 * x + 0.5 * y
    whole = ssim(x, y, reduction="none")
    monkeypatch.setattr(metrics, "SSIM_CHUNK_VALUES", 2 * 3 * 16 * 16)  # chunks of 2, 2, 2, 1 images
    chunked = ssim(x, y, reduction="none")
    assert chunked.shape == (7,)
    torch.testing.assert_close(chunked, whole, atol=1e-12, rtol=0)
    ref = torch.tensor([_skimage_ssim(x[i], y[i]) for i in range(7)], dtype=torch.float64)
    torch.testing.assert_close(chunked, ref, atol=1e-6, rtol=0)


def test_ssim_matches_skimage_on_structured_images():
    from skimage import filters

    photo = astronaut_crop()
    blurred = torch.from_numpy(
        filters.gaussian(photo.numpy(), sigma=1.0, channel_axis=0).astype(np.float32)
    )
    noisy = (photo + 0.1 * torch.randn(photo.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    for other in (blurred, noisy):
        ours = ssim(other[None], photo[None]).item()
        assert ours == pytest.approx(_skimage_ssim(other, photo), abs=1e-6)
        assert ours < 0.99
    assert ssim(photo[None], photo[None]).item() == pytest.approx(1.0)
    # a smaller window for small images, same parity
    small = photo[None, :, :8, :8]
    reference = _skimage_ssim(small[0] * 0.9, small[0], 0.5)
    assert ssim(small * 0.9, small, sigma=0.5).item() == pytest.approx(reference, abs=1e-6)


def test_ssim_averages_where_the_window_fits_not_torchmetrics_padded_border():
    # Why `ssim` crops torchmetrics' SSIM map: torchmetrics' own mean also covers a reflect-padded
    # border of int(3.5 * sigma + 0.5) px, which is not what skimage (and the paper's code) report.
    from torchmetrics.functional.image import structural_similarity_index_measure

    photo = astronaut_crop().double()
    blurred = torch.nn.functional.avg_pool2d(photo[None], 3, stride=1, padding=1)[0]
    reference = _skimage_ssim(blurred, photo)
    padded_mean = structural_similarity_index_measure(blurred[None], photo[None], data_range=2.0).item()
    assert abs(padded_mean - reference) > 0.05  # measured: 0.856 against skimage's 0.928
    assert ssim(blurred[None], photo[None]).item() == pytest.approx(reference, abs=1e-9)
    # on 16 px digits the border is most of the image: only 6x6 of 16x16 pixels are inside
    tiny, tiny_blurred = photo[None, :, ::4, ::4], blurred[None, :, ::4, ::4]
    assert ssim(tiny_blurred, tiny).item() == pytest.approx(_skimage_ssim(tiny_blurred[0], tiny[0]), abs=1e-9)


def test_ssim_window_larger_than_image_raises_with_advice():
    x = rand_pixels(1, 3, 8, 8)
    with pytest.raises(ValueError, match="smaller sigma"):
        ssim(x, x)


# ---------------------------------------------------------------- codebook


def test_codebook_usage_and_perplexity_of_constructed_codes():
    k = 16
    uniform = torch.arange(k).repeat(4).view(4, 4, 4)  # every code 4 times
    assert codebook_usage(uniform, k) == 1.0
    assert codebook_perplexity(uniform, k) == pytest.approx(k)
    one = torch.full((2, 4, 4), 3)
    assert codebook_usage(one, k) == 1 / k
    assert codebook_perplexity(one, k) == pytest.approx(1.0)
    half = torch.arange(k // 2).repeat(2)  # 8 codes, equally often; shape does not matter
    assert codebook_usage(half, k) == 0.5
    assert codebook_perplexity(half, k) == pytest.approx(k / 2)
    skewed = torch.tensor([0, 0, 0, 1])  # p = (3/4, 1/4)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert codebook_perplexity(skewed, k) == pytest.approx(math.exp(entropy))


def test_codebook_metrics_reject_bad_codes():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        codebook_usage(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="integer"):
        codebook_perplexity(torch.zeros(3), 4)


def test_reconstruction_metrics_of_a_pixel_tokenizer(pixel_tokenizer):
    codes = torch.arange(16).repeat(8).view(2, 8, 8)  # every palette colour equally often
    exact = pixel_tokenizer.decode(codes)
    report = reconstruction_metrics(pixel_tokenizer, exact, batch_size=1, ssim_sigma=0.5)
    assert math.isinf(report.psnr)
    assert report.ssim == pytest.approx(1.0)
    assert report.codebook_usage == 1.0
    assert report.codebook_perplexity == pytest.approx(16)
    noisy = (exact + 0.05 * torch.randn(exact.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    report = reconstruction_metrics(pixel_tokenizer, noisy, ssim_sigma=0.5)
    _, recon = pixel_tokenizer.reconstruct(noisy)
    assert report.psnr == pytest.approx(psnr(recon, noisy).item())
    assert 10 < report.psnr < 60 and report.ssim < 1


def test_reconstruct_batches_encode_then_decode(pixel_tokenizer):
    pixels = rand_pixels(5, 3, 8, 8)
    codes, recon = pixel_tokenizer.reconstruct(pixels, batch_size=2)  # batches of 2, 2, 1
    assert codes.shape == (5, *pixel_tokenizer.grid_shape) and codes.dtype == torch.long
    assert recon.shape == pixels.shape and recon.dtype == torch.float32 and recon.device.type == "cpu"
    with torch.no_grad():  # the reference: one encode and one decode over the whole batch
        assert torch.equal(codes, pixel_tokenizer.encode(pixels))
        assert torch.equal(recon, pixel_tokenizer.decode(codes))


# ---------------------------------------------------------------- classifier-based metrics


class NearestBrightness(torch.nn.Module):
    """A real (if simple) classifier: the class whose brightness centre is closest to the image mean."""

    def __init__(self, centres=(-0.5, 0.0, 0.5)):
        super().__init__()
        self.register_buffer("centres", torch.tensor(centres))

    def forward(self, x):
        return -(x.mean(dim=(1, 2, 3))[:, None] - self.centres) ** 2  # logits [B, C]


def images_of_brightness(values, size=4):
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, size, size).clone()


def test_classifier_accuracy_and_prompt_fidelity():
    clf = NearestBrightness()
    labels = [0] * 4 + [1] * 4 + [2] * 4
    brightness = [-0.5] * 4 + [0.0] * 4 + [0.5, 0.5, -0.5, 0.0]  # two of class 2 look like 0 and 1
    images = images_of_brightness(brightness)
    assert classifier_accuracy(clf, images, labels, batch_size=5) == pytest.approx(10 / 12)
    report = prompt_fidelity(clf, tensor_to_pil(images), labels)
    assert report.accuracy == pytest.approx(10 / 12)
    assert report.per_class == pytest.approx({0: 1.0, 1: 1.0, 2: 0.5})
    with pytest.raises(ValueError, match="labels"):
        classifier_accuracy(clf, images, labels[:-1])


def test_per_class_diversity_flags_a_collapsed_class():
    base = rand_pixels(3, 3, 4, 4)
    collapsed = base[:1].repeat(3, 1, 1, 1)  # class 0: one image three times
    varied = torch.stack([base[1], base[1] + 0.1, base[1] + 0.2])  # class 1: pairwise distances known
    report = per_class_diversity(torch.cat([collapsed, varied]), [0, 0, 0, 1, 1, 1])
    d = math.sqrt(48 * 0.01)  # 48 values each 0.1 apart
    assert report.per_class[0] == 0.0
    assert report.per_class[1] == pytest.approx((d + d + 2 * d) / 3, rel=1e-5)
    assert report.collapsed == [0]
    assert report.mean == pytest.approx(report.per_class[1] / 2)
    # with a feature extractor: features that ignore the offsets make class 1 collapse too
    centred = per_class_diversity(torch.cat([collapsed, varied]), [0, 0, 0, 1, 1, 1],
                                  feature_extractor=lambda x: x - x.mean(dim=(1, 2, 3), keepdim=True))
    assert centred.collapsed == [0, 1]
    with pytest.raises(ValueError, match="at least 2"):
        per_class_diversity(base, [0, 0, 1])


def test_caption_accuracy_uses_the_parser():
    parse = lambda text: int(text[-1]) if text[-1:].isdigit() else None  # noqa: E731
    assert caption_accuracy(["class 1", "class 2", "class ?", "class 0"], [1, 2, 3, 1], parse) == 0.5
    with pytest.raises(ValueError, match="labels"):
        caption_accuracy(["class 1"], [1, 2], parse)


# ---------------------------------------------------------------- FID


def tiny_features():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))


def test_fid_of_identical_sets_is_zero_and_grows_with_a_shift():
    net = tiny_features()
    real = rand_pixels(64, 3, 16, 16) * 0.5
    assert abs(fid(real, real, net, batch_size=16)) < 1e-4
    small = fid(real, real + 0.1, net)
    large = fid(real, real + 0.4, net)
    assert 0 < small < large


def test_fid_matches_the_closed_form_on_gaussian_features():
    # "Images" [N, 3, 2, 2] whose flattened pixels are Gaussian features of dimension 12.
    rng = np.random.default_rng(0)
    d, n = 12, 500
    a = rng.normal(size=(d, d)) / d
    real = rng.multivariate_normal(np.zeros(d), np.eye(d) * 0.5 + a @ a.T, size=n)
    fake = rng.multivariate_normal(np.full(d, 0.3), np.diag(np.linspace(0.2, 1.0, d)), size=n)
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    as_images = lambda f: torch.from_numpy(f).view(n, 3, 2, 2)  # noqa: E731
    ours = fid(as_images(real), as_images(fake), torch.nn.Flatten(), batch_size=128)
    assert ours == pytest.approx(expected, rel=1e-6)


def test_fid_needs_two_images_per_set():
    x = rand_pixels(3, 3, 8, 8)
    with pytest.raises(ValueError, match="at least 2"):
        fid(x, x[:1], torch.nn.Flatten())
