"""Web demo end to end: ``unimodal demo --model RUN_DIR`` serving a tiny pipeline, driven by
headless Chromium through Playwright.

Needs Debian's chromium at /usr/bin/chromium (``apt-get update && apt-get install -y chromium``;
``make setup`` does it). Never ``playwright install``: it downloads browsers. Chromium is told to
resolve no host but 127.0.0.1, and every request the page makes is checked to stay on the demo's
own origin. Screenshots go to tests/artifacts/ (or ``$UNIMODAL_TEST_ARTIFACTS``).
"""

import io
import os
import socket
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import httpx
import pytest
from PIL import Image

from unimodal.webdemo import DemoHandlers

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # Chromium phones home otherwise
    "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("UNIMODAL_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
PROMPT = "a handwritten digit seven"
TOAST = "[data-testid='toast-body']"  # gr.Error / gr.Warning messages
ALL_LOADED = """sel => { const imgs = [...document.querySelectorAll(sel)];
    return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0) }"""  # lazy images


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_pipeline_factory):
    """A run folder with the pipeline in ``final/`` (the end-to-end demo's layout); and the pipeline
    (tied Llama, 16 grey levels, 8x8 images)."""
    pipeline = tiny_pipeline_factory(tie=True, image_size=8)
    run = tmp_path_factory.mktemp("run")
    pipeline.save_pretrained(run / "final")
    return run, pipeline


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_process(run_dir, tmp_path_factory):
    """``unimodal demo`` started in a subprocess (it boots while the test computes expectations)."""
    run, _ = run_dir
    tmp = tmp_path_factory.mktemp("server")
    port = _free_port()
    with open(tmp / "server.log", "w+") as log:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "unimodal.cli", "demo", "--model", str(run), "--port", str(port),
             "--device", "cpu", "--temp-dir", str(tmp / "gradio")],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        yield proc, f"http://127.0.0.1:{port}/", log
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def expected(run_dir, server_process, tmp_path_factory):
    """What the page must show, computed in this process with the same pipeline."""
    _, pipeline = run_dir
    handlers = DemoHandlers(pipeline)
    images = [im for im, _ in handlers.text_to_image(PROMPT, 4, 7.0, 0.9, 4096, 0.99, 0)]
    photo = tmp_path_factory.mktemp("upload") / "china.jpg"  # a 640x427 photo shipped with scikit-learn
    photo.write_bytes((files("sklearn.datasets") / "images" / "china.jpg").read_bytes())
    with pytest.warns(UserWarning, match="centre square"):
        caption = handlers.image_to_text(str(photo), "", 64, 0, 0.9, 0)
    assert caption, "the tiny model must say something for the answer box to be checked"
    return {"images": images, "photo": photo, "caption": caption}


@pytest.fixture(scope="module")
def server(server_process, expected):
    """The demo's URL, once it answers."""
    proc, url, log = server_process
    deadline = time.monotonic() + 300  # imports + model load on a busy 2-core machine
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"`unimodal demo` exited with {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            if httpx.get(url + "config", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("`unimodal demo` did not answer within 300 s")
        time.sleep(0.25)


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


def test_generate_enlarge_caption_and_chat_in_the_browser(browser, server, expected):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(server)

    # Bad input is reported in the page, and the server goes on serving.
    page.click("#t2i-generate")
    error = page.locator(f"{TOAST}:has-text('Enter a prompt first')")
    error.wait_for()
    error.locator("[data-testid='toast-close']").click()
    error.wait_for(state="detached")

    # Text to image: 4 images in the gallery, the ones the pipeline makes for seeds 0..3.
    page.fill("#t2i-prompt textarea", PROMPT)
    page.click("#t2i-generate")
    page.wait_for_function(ALL_LOADED, arg="#t2i-gallery .thumbnail-item img", timeout=120_000)
    thumbnails = page.locator("#t2i-gallery .thumbnail-item img")
    assert thumbnails.count() == 4
    assert [thumbnails.nth(i).get_attribute("alt") for i in range(4)] == ["seed 0", "seed 1", "seed 2", "seed 3"]
    for i, image in enumerate(expected["images"]):
        body = page.request.get(thumbnails.nth(i).get_attribute("src")).body()
        assert Image.open(io.BytesIO(body)).convert("RGB").tobytes() == image.tobytes()

    # Click to enlarge: the preview shows the clicked image, larger than its thumbnail.
    small = thumbnails.nth(1).bounding_box()
    thumbnails.nth(1).click()
    preview = page.locator("#t2i-gallery .preview img").first
    preview.wait_for()
    page.wait_for_function(ALL_LOADED, arg="#t2i-gallery .preview img")
    assert preview.get_attribute("alt") == "seed 1"
    assert preview.bounding_box()["width"] > small["width"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "webdemo-text-to-image.png")

    # Image to text: upload a photo, get the caption the pipeline gives, and the crop warning.
    page.get_by_role("tab", name="Image To Text").click()
    page.set_input_files("#i2t-image input[type=file]", str(expected["photo"]))
    page.wait_for_function(ALL_LOADED, arg="#i2t-image img", timeout=30_000)
    page.click("#i2t-describe")
    page.wait_for_function("() => document.querySelector('#i2t-answer textarea').value.length > 0",
                           timeout=60_000)
    assert page.input_value("#i2t-answer textarea") == expected["caption"]
    page.locator(f"{TOAST}:has-text('centre square is what the model sees')").wait_for()
    page.screenshot(path=ARTIFACTS / "webdemo-image-to-text.png", full_page=True)

    # Text to text: one chat turn renders as a user and a bot message.
    page.get_by_role("tab", name="Text To Text").click()
    page.fill("#t2t-message textarea", "hello there")
    page.click("#t2t-send")
    page.wait_for_selector("#t2t-chat [data-testid='bot']", timeout=60_000)
    assert page.locator("#t2t-chat [data-testid='user']").inner_text().strip() == "hello there"
    assert page.input_value("#t2t-message textarea") == ""

    # Offline: the page fetched nothing from anywhere but the demo itself.
    outside = [u for u in requests if not u.startswith((server, "data:", "blob:"))]
    assert outside == [], f"the page made requests off the local server: {outside[:5]}"
    for name in ("webdemo-text-to-image.png", "webdemo-image-to-text.png"):
        assert Image.open(ARTIFACTS / name).size[0] == 1280
    page.close()
