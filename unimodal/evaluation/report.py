"""Quality bars and the report: `Target`, `check_targets`, `render_report`, `write_report`.

``metrics.json`` holds every number (targets included); ``report.md`` puts several models (e.g.
the VQ-GAN and the pixel baseline) side by side: targets, a comparison table, per-class numbers,
images, caption examples, stage times and notes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .scoring import ModelEvaluation


@dataclass
class Target:
    """A quality bar: ``metric`` (a dotted path into `ModelEvaluation`) must be >= or <= ``threshold``."""

    metric: str  # e.g. "text_to_image.prompt_fidelity"
    threshold: float
    higher_is_better: bool = True
    label: str = ""

    def value(self, evaluation: ModelEvaluation) -> float:
        node: Any = asdict(evaluation)
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
