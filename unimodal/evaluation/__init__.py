"""Evaluate a unified text + image LM end to end, and write the numbers as JSON and Markdown.

Four modules, each usable alone and on any labelled image data (the digits demo is one example):

- `metrics`: the measures themselves (PSNR, SSIM, codebook use, prompt fidelity, diversity, FID,
  caption accuracy) on pixels ``[B, 3, H, W]`` in [-1, 1] or PIL images;
- `scoring`: `score_tokenizer`, `score_text_to_image`, `score_image_to_text` on images and
  captions you already have, and `ModelEvaluation` (all of them for one model);
- `driver`: `evaluate_model` generates a class-by-sample grid and captions held-out images with a
  `UnimodalPipeline`, then scores them;
- `report`: `Target`, `check_targets`, `render_report`, `write_report` (``metrics.json`` +
  ``report.md``), so several models sit side by side.
"""

from .driver import caption_images, evaluate_model
from .metrics import (
    ReconstructionReport,
    caption_accuracy,
    classifier_accuracy,
    codebook_perplexity,
    codebook_usage,
    fid,
    per_class_diversity,
    predict_labels,
    prompt_fidelity,
    psnr,
    reconstruction_metrics,
    reconstruction_report,
    ssim,
)
from .report import COMPARISON_ROWS, Target, check_targets, render_report, write_report
from .scoring import (
    ImageToTextScores,
    ModelEvaluation,
    TextToImageScores,
    TokenizerScores,
    distinct_fraction,
    score_image_to_text,
    score_text_to_image,
    score_tokenizer,
)

__all__ = [
    "COMPARISON_ROWS", "ImageToTextScores", "ModelEvaluation", "ReconstructionReport", "Target",
    "TextToImageScores", "TokenizerScores", "caption_accuracy", "caption_images", "check_targets",
    "classifier_accuracy", "codebook_perplexity", "codebook_usage", "distinct_fraction", "evaluate_model",
    "fid", "per_class_diversity", "predict_labels", "prompt_fidelity", "psnr", "reconstruction_metrics",
    "reconstruction_report", "render_report", "score_image_to_text", "score_text_to_image",
    "score_tokenizer", "ssim", "write_report",
]
