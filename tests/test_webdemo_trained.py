"""The web demo on the digits demo's own trained model, in a real browser (issue #14).

A newcomer runs `make demo`, then ``unimodal demo --model outputs/digits-demo``: the page must
start at the settings the report was made with (saved in ``final/generation_config.json``), draw
the report's images for the report's seeds, and score with the judge at the report's prompt
fidelity. Here the demo runs at reduced size (a small VQ-GAN and LM, no baseline; ~7 min
on 2 busy cores), trained enough that the judge tells its digits apart (prompt fidelity ~0.5). Browser setup as in
tests/test_webdemo_browser.py: Debian's chromium, no host resolved but 127.0.0.1, no analytics.
"""

import io
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from digits import DigitClassifier, caption_for  # examples/digits/digits.py (pytest's pythonpath)
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--no-sandbox", "--disable-gpu",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SAMPLES = 8  # per digit in the report: the page's 4 default images, twice
PAGE_IMAGES = 4  # the page's default number of images per request
DISPLAY = 48  # the report grid's cell side (the demo's display_size default)
ALL_LOADED = """([sel, alt]) => { const imgs = [...document.querySelectorAll(sel)];
    return imgs.length > 0 && imgs[0].alt === alt && imgs.every(i => i.complete && i.naturalWidth > 0) }"""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory) -> Path:
    """examples/digits/run.py at reduced size, as a user runs it: its own stage configs shrunk."""
    tmp = tmp_path_factory.mktemp("digits")
    tokenizer_cfg = yaml.safe_load((REPO / "examples/digits/tokenizer.yaml").read_text())
    tokenizer_cfg["model"].update(ch=8, z_channels=16, codebook_size=32)
    # 300 steps, the discriminator for the last third: ~95% of reconstructions keep their digit.
    tokenizer_cfg.update(disc_start=200, sample_steps=1000, save_steps=1000, report_to="none", eval_samples=32)
    finetune_cfg = yaml.safe_load((REPO / "examples/digits/finetune.yaml").read_text())
    finetune_cfg["build"].update(hidden_size=64, num_layers=2)
    finetune_cfg.update(report_to="none", save_steps=1000)
    for name, cfg in (("tokenizer.yaml", tokenizer_cfg), ("finetune.yaml", finetune_cfg)):
        (tmp / name).write_text(yaml.safe_dump(cfg))
    out = tmp / "demo"
    result = subprocess.run(
        [sys.executable, "examples/digits/run.py", "--output_dir", str(out),
         "--tokenizer_config", str(tmp / "tokenizer.yaml"), "--tokenizer_steps", "300",
         "--finetune_config", str(tmp / "finetune.yaml"), "--augment_copies", "1", "--finetune_epochs", "2",
         "--baseline", "false", "--samples_per_digit", str(SAMPLES), "--grid_columns", str(SAMPLES),
         "--display_size", str(DISPLAY)],
        cwd=REPO, capture_output=True, text=True, timeout=2400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def report(demo_output) -> dict:
    return json.loads((demo_output / "metrics.json").read_text())["models"]["VQ-GAN"]


def test_the_settings_file_exists_and_matches_the_report(demo_output, report):
    saved = json.loads((demo_output / "final" / "generation_config.json").read_text())["unimodal_image"]
    settings = report["settings"]  # the rows of the report's comparison table
    assert (settings["guidance scale"], settings["temperature"], settings["top-k"], settings["top-p"]) == (
        saved["guidance_scale"], saved["temperature"], saved["top_k"] or "off", saved["top_p"])
    config = json.loads((demo_output / "metrics.json").read_text())["config"]
    assert (saved["guidance_scale"], saved["temperature"]) == (config["guidance_scale"], config["temperature"])
    assert saved == {"guidance_scale": 3.0, "temperature": 1.0, "top_k": None, "top_p": 1.0, "do_sample": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(demo_output, tmp_path_factory):
    """``unimodal demo --model <the demo's output folder>``, as the README says; its URL once it answers."""
    tmp = tmp_path_factory.mktemp("server")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(tmp / "server.log", "w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "unimodal.cli", "demo", "--model", str(demo_output), "--port", str(port),
             "--device", "cpu", "--temp-dir", str(tmp / "gradio")], stdout=log, stderr=subprocess.STDOUT, env=env)
        url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 300
        try:
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"`unimodal demo` exited with {proc.returncode}:\n{log.read()[-3000:]}")
                try:
                    if httpx.get(url + "config", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail("`unimodal demo` did not answer within 300 s")
                time.sleep(0.25)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install it with `apt-get update && apt-get install -y "
                    "chromium` (or run `make setup`); do not use `playwright install`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def _report_images(demo_output: Path, digit: int) -> list[Image.Image]:
    """Digit ``digit``'s row of the report's grid (make_grid: 2 px padding), back at 16 px."""
    grid = Image.open(demo_output / "vq-gan-text-to-image.png").convert("RGB")
    top = 2 + digit * (DISPLAY + 2)
    cells = [grid.crop((2 + c * (DISPLAY + 2), top, 2 + c * (DISPLAY + 2) + DISPLAY, top + DISPLAY))
             for c in range(SAMPLES)]
    return [cell.resize((16, 16), Image.NEAREST) for cell in cells]  # undoes the nearest-neighbour upscale


def test_the_page_draws_the_reports_images_at_the_reports_fidelity(browser, server, demo_output, report):
    import torch

    from unimodal.images import pil_to_tensor

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server)
    note = page.locator("#t2i-sampling-source").inner_text()
    assert note.startswith("Sampling settings: from the model's generation_config.json"), note
    page.locator("#t2i-advanced").get_by_text("Advanced Settings").click()  # open it: the seed is inside
    shown = {name: float(page.input_value(f"#t2i-{name} input[type=number]"))
             for name in ("guidance", "temperature", "top-k", "top-p", "num-images")}
    assert shown == {"guidance": 3.0, "temperature": 1.0, "top-k": 0.0, "top-p": 1.0, "num-images": PAGE_IMAGES}

    # The report's image i of digit d used seed d * SAMPLES + i: ask the page for the same seeds.
    drawn: dict[int, list[Image.Image]] = {}
    for digit in range(10):
        page.fill("#t2i-prompt textarea", caption_for(digit))
        for first in range(digit * SAMPLES, (digit + 1) * SAMPLES, PAGE_IMAGES):
            page.fill("#t2i-seed input", str(first))
            page.click("#t2i-generate")
            page.wait_for_function(ALL_LOADED, arg=["#t2i-gallery .thumbnail-item img", f"seed {first}"],
                                   timeout=120_000)
            thumbnails = page.locator("#t2i-gallery .thumbnail-item img")
            assert thumbnails.count() == PAGE_IMAGES
            for i in range(PAGE_IMAGES):
                body = page.request.get(thumbnails.nth(i).get_attribute("src")).body()
                drawn.setdefault(digit, []).append(Image.open(io.BytesIO(body)).convert("RGB"))
    page.close()

    # The same images as the report's grid (the report made them in one batch of all 80 prompts,
    # the page in batches of 4: float noise may flip a rare sample, nothing more).
    same = sum(a.tobytes() == b.tobytes() for d in range(10) for a, b in zip(drawn[d], _report_images(demo_output, d)))
    assert same >= 0.9 * 10 * SAMPLES, f"only {same} of {10 * SAMPLES} page images are the report's"

    # The judge scores them at the report's prompt fidelity, within the sampling noise of 80 images.
    judge = DigitClassifier.load(demo_output / "classifier")
    pixels = pil_to_tensor([im for d in range(10) for im in drawn[d]])  # [80, 3, 16, 16] in [-1, 1]
    labels = torch.tensor([d for d in range(10) for _ in range(SAMPLES)])
    fidelity = (judge.predict(pixels) == labels).double().mean().item()
    expected = report["text_to_image"]["prompt_fidelity"]
    noise = 2 * math.sqrt(max(expected * (1 - expected), 0.01) / len(labels))
    assert abs(fidelity - expected) <= noise, (fidelity, expected)
    # (measured: 0.475; chance is 0.1)
    assert expected > 0.25, f"the reduced demo's model should draw digits the judge tells apart; fidelity {expected}"
