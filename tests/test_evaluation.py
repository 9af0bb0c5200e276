"""unimodal.evaluation: known values on constructed inputs, and the generate + score wiring."""

import json
import math

import pytest
import torch
from PIL import Image
from torch import nn

from unimodal import PixelTokenizer, PixelTokenizerConfig
from unimodal.evaluation import (
    ImageToTextScores,
    ModelEvaluation,
    Target,
    TextToImageScores,
    TokenizerScores,
    check_targets,
    distinct_fraction,
    evaluate_model,
    render_report,
    score_image_to_text,
    score_text_to_image,
    score_tokenizer,
    write_report,
)
from unimodal.images import tensor_to_pil


class BrightnessJudge(nn.Module):
    """A constructed classifier: class 0 for dark images (mean < 0), class 1 for bright ones."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        m = pixels.mean(dim=(1, 2, 3))
        return torch.stack([-m, m], dim=1)  # [B, 2]

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.stack([pixels.mean(dim=(1, 2, 3)), pixels.std(dim=(1, 2, 3))], dim=1)  # [B, 2]


def flat(value: float, n: int = 1, size: int = 8) -> torch.Tensor:
    return torch.full((n, 3, size, size), value)


def noisy(value: float, n: int, seed: int, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (value + 0.1 * torch.randn(n, 3, size, size, generator=g)).clamp(-1, 1)


# ---------------------------------------------------------------- tokenizer


def test_score_tokenizer_of_exactly_representable_images():
    tok = PixelTokenizer(PixelTokenizerConfig(codebook_size=4, image_size=8, pixel_size=2))  # greys -1, -1/3, 1/3, 1
    # 2x2 blocks of palette colours 0 and 3 only: reconstructed exactly, half the codebook used.
    codes = torch.tensor([[0, 3, 0, 3], [3, 0, 3, 0], [0, 0, 3, 3], [3, 3, 0, 0]])
    img = tok.decode(torch.stack([codes, 3 - codes]))  # [2, 3, 8, 8]
    scores = score_tokenizer(tok, img, labels=[0, 0], classifier=BrightnessJudge(), ssim_sigma=0.5)
    assert scores.tokens_per_image == 16 and scores.codebook_size == 4
    assert math.isinf(scores.psnr) and scores.ssim == pytest.approx(1.0)
    assert scores.codebook_usage == 0.5
    assert scores.codebook_perplexity == pytest.approx(2.0)  # codes 0 and 3 equally often
    # Both images average to 0: the judge's tie goes to class 0 (argmax takes the first).
    assert scores.recon_accuracy == 1.0
    assert scores.recon_fid is None


def test_score_tokenizer_needs_labels_with_a_classifier():
    tok = PixelTokenizer(PixelTokenizerConfig(codebook_size=4, image_size=8))
    with pytest.raises(ValueError, match="labels"):
        score_tokenizer(tok, flat(0.0, 2), classifier=BrightnessJudge())


# ---------------------------------------------------------------- text-to-image


def test_distinct_fraction():
    a, b = flat(-0.5), flat(0.5)
    assert distinct_fraction(torch.cat([a, a, b, flat(0.1)])) == 0.75
    assert distinct_fraction(torch.cat([a, a])) == 0.5


def mean_pairwise(x: torch.Tensor) -> float:
    f = x.flatten(1).double()
    return (torch.cdist(f, f).sum() / (len(f) * (len(f) - 1))).item()


def test_score_text_to_image_known_fidelity_and_diversity():
    real = torch.cat([noisy(-0.5, 4, 0), noisy(0.5, 4, 1)])
    real_labels = [0] * 4 + [1] * 4
    # Class 0: three real dark images and one bright one (a miss); class 1: three copies of one
    # bright image and one other (half the images distinct, a narrower spread than real).
    gen_0 = torch.cat([real[:3], flat(0.9)])
    gen_1 = torch.cat([real[4:5].repeat(3, 1, 1, 1), real[5:6]])
    scores = score_text_to_image(torch.cat([gen_0, gen_1]), real_labels, real, real_labels, BrightnessJudge())
    assert scores.prompt_fidelity == pytest.approx(7 / 8)
    assert scores.per_class_fidelity == pytest.approx({0: 0.75, 1: 1.0})
    assert scores.distinct_fraction == pytest.approx((1.0 + 0.5) / 2)
    assert scores.collapsed_classes == []  # class 1 still has two different images
    assert scores.fid is None  # no feature extractor
    # Diversity on raw pixels, by hand: per class mean pairwise distance, generated / real.
    ratios = [mean_pairwise(gen_0) / mean_pairwise(real[:4]), mean_pairwise(gen_1) / mean_pairwise(real[4:])]
    assert ratios[1] < 1 < ratios[0]  # the far-off miss widens class 0
    assert scores.min_diversity_ratio == pytest.approx(ratios[1])
    assert scores.diversity == pytest.approx((mean_pairwise(gen_0) + mean_pairwise(gen_1)) / 2)
    assert scores.real_diversity == pytest.approx((mean_pairwise(real[:4]) + mean_pairwise(real[4:])) / 2)


def test_score_text_to_image_of_real_images_is_perfect_and_flags_collapse():
    real = torch.cat([noisy(-0.5, 6, 0), noisy(0.5, 6, 1)])
    labels = [0] * 6 + [1] * 6
    same = score_text_to_image(real, labels, real, labels, BrightnessJudge(), BrightnessJudge().features)
    assert same.prompt_fidelity == 1.0 and same.min_diversity_ratio == pytest.approx(1.0)
    assert same.fid == pytest.approx(0.0, abs=1e-4)
    collapsed = score_text_to_image(torch.cat([real[:1].repeat(6, 1, 1, 1), real[6:]]), labels, real, labels,
                                    BrightnessJudge(), BrightnessJudge().features)
    assert collapsed.collapsed_classes == [0]
    assert collapsed.min_diversity_ratio == 0.0 and collapsed.distinct_fraction == pytest.approx((1 / 6 + 1) / 2)


def test_score_text_to_image_needs_real_images_of_every_class():
    real = noisy(-0.5, 4, 0)
    with pytest.raises(ValueError, match="no real images"):
        score_text_to_image(torch.cat([real, real]), [0] * 4 + [1] * 4, real, [0] * 4, BrightnessJudge())


# ---------------------------------------------------------------- image-to-text


def test_score_image_to_text_overall_and_per_class():
    parse = {"zero": 0, "one": 1}.get
    scores = score_image_to_text(["zero", "one", "one", "two", "zero"], [0, 1, 0, 1, 0], parse, num_examples=2)
    assert scores.caption_accuracy == pytest.approx(3 / 5)
    assert scores.per_class_accuracy == pytest.approx({0: 2 / 3, 1: 1 / 2})
    assert scores.examples == [{"label": 0, "caption": "zero"}, {"label": 1, "caption": "one"}]


# ---------------------------------------------------------------- targets and report


def constructed_evaluation(name: str = "VQ-GAN", fidelity: float = 0.75) -> ModelEvaluation:
    return ModelEvaluation(
        name=name, sequence_length=24,
        tokenizer=TokenizerScores(16, 256, 25.5, 0.9, 0.5, 100.0, 0.98, 3.2),
        text_to_image=TextToImageScores(fidelity, {0: 1.0, 1: 0.5}, 2.0, 4.0, 0.4, 1.0, [], 12.5),
        image_to_text=ImageToTextScores(0.96, {0: 1.0, 1: 0.92}, [{"label": 1, "caption": "a digit one"}]),
        seconds={"fine-tune": 120.0}, images={"text-to-image": f"{name}.png"}, settings={"epochs": 6.0},
    )


def test_targets_read_nested_metrics_and_compare():
    ev = constructed_evaluation()
    rows = check_targets(ev, [Target("text_to_image.prompt_fidelity", 0.9),
                              Target("image_to_text.caption_accuracy", 0.95, label="captions"),
                              Target("text_to_image.fid", 10.0, higher_is_better=False)])
    assert [(r["label"], r["value"], r["passed"]) for r in rows] == [
        ("text_to_image.prompt_fidelity", 0.75, False), ("captions", 0.96, True), ("text_to_image.fid", 12.5, False)]
    with pytest.raises(KeyError, match="no 'fidelity'"):
        Target("text_to_image.fidelity", 0.9).value(ev)


def test_write_report_round_trips_numbers_and_renders_tables(tmp_path):
    evs = [constructed_evaluation(), constructed_evaluation("PixelTokenizer", fidelity=0.5)]
    target = Target("text_to_image.prompt_fidelity", 0.9, label="fidelity")
    metrics_path, report_path = write_report(tmp_path, evs, title="Demo", targets=[target],
                                             class_names=["zero", "one"], notes=["a note"],
                                             stage_times={"train": {"wall s": 61.4, "CPU s": 50.2},
                                                          "total": {"wall s": 70.0}},
                                             extra={"judge_accuracy": 0.99})
    metrics = json.loads(metrics_path.read_text())
    assert metrics["models"]["PixelTokenizer"]["text_to_image"]["prompt_fidelity"] == 0.5
    assert metrics["models"]["VQ-GAN"]["tokenizer"]["psnr"] == 25.5
    assert metrics["targets"][0]["passed"] is False and metrics["judge_accuracy"] == 0.99
    report = report_path.read_text()
    assert report == render_report(evs, title="Demo", targets=[target], class_names=["zero", "one"],
                                   notes=["a note"], stage_times=metrics["stage_times"])
    assert "| fidelity | >= 0.90 | 0.750 | **no** |" in report
    assert "| text-to-image prompt fidelity | 75.0% | 50.0% |" in report
    assert "| image tokens per image | 16 | 16 |" in report and "| epochs | 6 | 6 |" in report
    assert "| time: fine-tune (s) | 120 | 120 |" in report
    assert "| one | 50.0% / 92.0% | 50.0% / 92.0% |" in report
    assert "![VQ-GAN text-to-image](VQ-GAN.png)" in report
    assert "| train | 61 | 50 |" in report and "| total | 70 | n/a |" in report and "- a note" in report
    with pytest.raises(ValueError, match="at least one"):
        write_report(tmp_path, [], title="x")


# ---------------------------------------------------------------- generate + score a real pipeline


def test_evaluate_model_generates_captions_and_scores_a_tiny_pipeline(tmp_path, text_tokenizer):
    from unimodal.extend import add_image_tokens
    from unimodal.offline import build_causal_lm
    from unimodal.pipeline import UnimodalPipeline

    tok = PixelTokenizer(PixelTokenizerConfig(codebook_size=4, image_size=8, pixel_size=2))
    lm = build_causal_lm(vocab_size=len(text_tokenizer), hidden_size=32)
    pipe = UnimodalPipeline(lm.eval(), add_image_tokens(lm, text_tokenizer, tok))
    real = torch.cat([noisy(-0.5, 3, 0), noisy(0.5, 3, 1)])
    real_pil = tensor_to_pil(real)
    ev = evaluate_model("Pixel baseline", pipe, ["a dark image", "a bright image"], real_pil, [0, 0, 0, 1, 1, 1],
                        BrightnessJudge(), lambda c: None, tmp_path, samples_per_prompt=3, grid_columns=2,
                        display_size=16, sequence_length=24, ssim_sigma=0.5)
    # 2 prompts x 2 shown columns of 16 px images, make_grid's 2 px padding
    grid = Image.open(tmp_path / ev.images["text-to-image"])
    assert grid.size == (2 * 18 + 2, 2 * 18 + 2)
    assert Image.open(tmp_path / ev.images["reconstructions"]).size == (6 * 18 + 2, 2 * 18 + 2)
    assert ev.tokenizer.tokens_per_image == 16 and ev.sequence_length == 24
    assert set(ev.text_to_image.per_class_fidelity) == {0, 1}
    assert ev.image_to_text.caption_accuracy == 0.0  # the parser finds no class in any caption
    assert len(ev.image_to_text.examples) == 6
    assert set(ev.seconds) == {"generate", "caption"}
