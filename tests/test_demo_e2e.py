"""The demo (`make demo` = examples/digits/run.py) end to end at reduced size, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_digits_demo_end_to_end(tmp_path):
    # The demo's own stage configs, shrunk: a tiny VQ-GAN and a tiny LM (the wiring is what is
    # tested here; the real sizes are measured by `make demo` and reported in README.md).
    tokenizer_cfg = yaml.safe_load((REPO / "examples/digits/tokenizer.yaml").read_text())
    tokenizer_cfg["model"].update(ch=8, z_channels=16, codebook_size=32)
    tokenizer_cfg.update(disc_start=4, sample_steps=4, save_steps=4, report_to="none", eval_samples=32)
    finetune_cfg = yaml.safe_load((REPO / "examples/digits/finetune.yaml").read_text())
    finetune_cfg["build"].update(hidden_size=32, num_layers=2)
    finetune_cfg.update(report_to="none", save_steps=1000)
    for name, cfg in (("tokenizer.yaml", tokenizer_cfg), ("finetune.yaml", finetune_cfg)):
        (tmp_path / name).write_text(yaml.safe_dump(cfg))
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "examples/digits/run.py", "--output_dir", str(out),
         "--tokenizer_config", str(tmp_path / "tokenizer.yaml"), "--tokenizer_steps", "8",
         "--finetune_config", str(tmp_path / "finetune.yaml"), "--augment_copies", "1",
         "--finetune_epochs", "0.1", "--baseline_epochs", "0.05",
         "--classifier_epochs", "1", "--samples_per_digit", "3", "--grid_columns", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert f"report:  {out / 'report.md'}" in result.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    vq, pixel = metrics["models"]["VQ-GAN"], metrics["models"]["PixelTokenizer"]
    # 16 px: VQ-GAN f4 -> 4x4 tokens; the pixel baseline's 2x2 blocks -> 8x8 tokens
    assert vq["tokenizer"]["tokens_per_image"] == 16 and pixel["tokenizer"]["tokens_per_image"] == 64
    assert pixel["sequence_length"] == vq["sequence_length"] + 48
    for model in (vq, pixel):
        # At this reduced size fidelity sits near chance, so what is checked is that the number
        # is what the report says it is: the mean over 10 digits of 3 judged samples each.
        t2i = model["text_to_image"]
        per_class = t2i["per_class_fidelity"]
        assert len(per_class) == 10
        assert t2i["prompt_fidelity"] == pytest.approx(sum(per_class.values()) / 10)
        assert t2i["prompt_fidelity"] * 10 * 3 == pytest.approx(round(t2i["prompt_fidelity"] * 30))
        assert len(model["image_to_text"]["per_class_accuracy"]) == 10
        assert model["seconds"]["fine-tune CPU"] > 0
        for png in model["images"].values():
            Image.open(out / png).verify()
    assert [t["label"] for t in metrics["targets"]] == [
        "text-to-image prompt fidelity", "image-to-text caption accuracy",
        "not collapsed: worst class diversity / real"]
    report = (out / "report.md").read_text()
    assert "| image tokens per image | 16 | 64 |" in report
    assert "![VQ-GAN text-to-image](vq-gan-text-to-image.png)" in report

    # The model folder users open: a plain causal LM plus processor, loadable as a pipeline.
    from transformers import AutoModelForCausalLM

    from unimodal.pipeline import UnimodalPipeline

    assert AutoModelForCausalLM.from_pretrained(out / "final").config.hidden_size == 32
    pipe = UnimodalPipeline.from_pretrained(out / "final")
    image = pipe.generate_images("a handwritten digit one", seed=0, progress=False)[0]
    assert image.size == (16, 16)
