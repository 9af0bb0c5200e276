"""Web demo, server side: handler validation, parity with the pipeline, and the real gradio queue.

The handlers are called directly and through a launched server with ``gradio_client`` (the same
queue the page uses). A tiny random Llama + PixelTokenizer pipeline is built in-process.
"""

import math
import threading
from importlib.metadata import entry_points

import gradio as gr
import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from unimodal.cli import main as cli_main
from unimodal.generation import PRESETS
from unimodal.outputs import resolve_output
from unimodal.webdemo import (
    DemoHandlers,
    DemoLimits,
    build_demo,
    load_pipeline,
    offline_theme,
    serve,
)

LIQUID_ARGS = dict(guidance_scale=7.0, temperature=0.9, top_k=4096, top_p=0.99)
GOOD_T2I = dict(prompt="a cat", num_images=2, seed=3, **LIQUID_ARGS)
GOOD_TEXT = dict(max_new_tokens=8, temperature=0, top_p=0.9, seed=0)


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline_factory):
    """Tied Llama, 16 grey levels, 4x4 images of 16 tokens (the warnings below count them)."""
    return tiny_pipeline_factory(tie=True, image_size=4)


@pytest.fixture(scope="module")
def handlers(pipeline):
    return DemoHandlers(pipeline)


def t2i(handlers, **changes):
    args = {**GOOD_T2I, **changes}
    return handlers.text_to_image(args["prompt"], args["num_images"], args["guidance_scale"],
                                  args["temperature"], args["top_k"], args["top_p"], args["seed"])


def i2t(handlers, image, question="", **changes):
    args = {**GOOD_TEXT, **changes}
    return handlers.image_to_text(image, question, args["max_new_tokens"], args["temperature"],
                                  args["top_p"], args["seed"])


def png_file(path, size=(4, 4), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)
    return str(path)


# ---------------------------------------------------------------------------- model folder
def test_resolve_output_accepts_pipeline_run_and_hub_names(pipeline, tmp_path):
    pipeline.save_pretrained(tmp_path / "pipe")
    pipeline.save_pretrained(tmp_path / "ft" / "final")
    assert resolve_output(tmp_path / "pipe") == str(tmp_path / "pipe")
    assert resolve_output(tmp_path / "ft") == str(tmp_path / "ft" / "final")
    assert resolve_output(tmp_path / "ft" / "final") == str(tmp_path / "ft" / "final")
    assert resolve_output("someone/tiny-unimodal") == "someone/tiny-unimodal"  # not a local path
    with pytest.raises(FileNotFoundError, match="holds no processor_config.json"):
        resolve_output(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        resolve_output(tmp_path / "missing" / "final")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        cli_main(["demo", "--model", str(tmp_path / "missing" / "model")])
    (script,) = entry_points(group="console_scripts", name="unimodal")
    assert script.value == "unimodal.cli:main"

    loaded = load_pipeline(tmp_path / "ft", dtype="float32", device="cpu")
    expected = pipeline.generate_images("a cat", 2, seed=3, progress=False, **LIQUID_ARGS)
    got = [image for image, _ in t2i(DemoHandlers(loaded))]
    assert [im.tobytes() for im in got] == [im.tobytes() for im in expected]
    with pytest.raises(ValueError, match="torch dtype name"):
        load_pipeline(tmp_path / "ft", dtype="float99")


# ---------------------------------------------------------------------------- page
def test_page_has_liquid_defaults_tabs_and_offline_settings(pipeline):
    demo = build_demo(pipeline)
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    liquid = PRESETS["liquid"]
    assert (liquid.guidance_scale, liquid.temperature, liquid.top_k, liquid.top_p) == (7.0, 0.9, 4096, 0.99)
    names = ("guidance", "temperature", "top-k", "top-p", "num-images")
    settings = {name: by_id[f"t2i-{name}"].value for name in names}
    assert settings == {"guidance": 7.0, "temperature": 0.9, "top-k": 4096, "top-p": 0.99, "num-images": 4}
    labels = {getattr(b, "label", None) for b in demo.blocks.values()}
    assert {"Text To Image", "Image To Text", "Text To Text", "Advanced Settings"} <= labels
    assert demo.analytics_enabled is False
    api = {fn.api_name for fn in demo.fns.values() if fn.api_name}
    assert {"text_to_image", "image_to_text", "chat"} <= api
    queued = [fn for fn in demo.fns.values() if fn.api_name in ("text_to_image", "image_to_text", "chat")]
    assert {fn.concurrency_id for fn in queued} == {"model"}  # one model, one queue slot
    assert all(fn.concurrency_limit == 1 for fn in queued)
    # Fonts served by the app or the system, never fetched from Google.
    assert not any("googleapis" in str(sheet) for sheet in offline_theme()._stylesheets)


# ---------------------------------------------------------------------------- text to image
def test_text_to_image_returns_n_images_each_reproducible_from_its_seed(handlers, pipeline):
    results = t2i(handlers, num_images=3, seed=5)
    assert [caption for _, caption in results] == ["seed 5", "seed 6", "seed 7"]
    assert all(image.size == (4, 4) and image.mode == "RGB" for image, _ in results)
    alone = pipeline.generate_images("a cat", 1, seed=6, progress=False, **LIQUID_ARGS)[0]
    assert results[1][0].tobytes() == alone.tobytes()


@pytest.mark.parametrize("changes, message", [
    (dict(prompt=""), "Enter a prompt first"),
    (dict(prompt="   "), "Enter a prompt first"),
    (dict(prompt=None), "Enter a prompt first"),
    (dict(prompt="x" * 2001), "2001 characters; the limit is 2000"),
    (dict(prompt="a <image> here"), "Remove <image>"),
    (dict(num_images=0), r"Number of images must be in \[1, 8\]"),
    (dict(num_images=9), r"Number of images must be in \[1, 8\]"),
    (dict(num_images=2.5), "Number of images must be a whole number"),
    (dict(guidance_scale=0.5), r"Guidance scale must be in \[1, 20\]"),
    (dict(guidance_scale=math.nan), "Guidance scale must be in"),
    (dict(guidance_scale="lots"), "Guidance scale must be a number"),
    (dict(temperature=0), r"Temperature must be in \(0, 2\]"),
    (dict(temperature=2.5), r"Temperature must be in \(0, 2\]"),
    (dict(top_k=-1), "Top-k must be in"),
    (dict(top_p=0), r"Top-p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"Top-p must be in \(0, 1\]"),
    (dict(seed=-1), "Seed must be in"),
    (dict(seed=None), "Seed must be a number"),
])
def test_text_to_image_rejects_bad_input_with_a_named_message(handlers, changes, message):
    with pytest.raises(gr.Error, match=message):
        t2i(handlers, **changes)


def test_text_to_image_refuses_prompts_longer_than_the_context(pipeline):
    handlers = DemoHandlers(pipeline, DemoLimits(max_prompt_chars=100_000))
    with pytest.raises(gr.Error, match="the model reads at most 512. Shorten the prompt"):
        t2i(handlers, prompt="zebra quartz " * 400)


# ---------------------------------------------------------------------------- image to text
def test_image_to_text_matches_the_pipeline_for_paths_payloads_and_questions(handlers, pipeline, tmp_path):
    path = png_file(tmp_path / "red.png")
    image = Image.open(path).convert("RGB")
    caption = pipeline.generate_text("", images=[image], max_new_tokens=8, preset="greedy")
    answer = pipeline.generate_text("what is it?", images=[image], max_new_tokens=8, preset="greedy")
    assert caption != answer  # the question reaches the model
    assert i2t(handlers, path) == caption
    assert i2t(handlers, {"path": path, "orig_name": "red.png", "meta": {"_type": "gradio.FileData"}}) == caption
    assert i2t(handlers, image) == caption
    assert i2t(handlers, path, "what is it?") == answer
    sampled = pipeline.generate_text("", images=[image], max_new_tokens=8, temperature=1.5, top_p=0.9, seed=4)
    assert i2t(handlers, path, temperature=1.5, seed=4) == sampled


def test_image_to_text_warns_about_cropping_and_shortened_answers(handlers, tmp_path):
    with pytest.warns(UserWarning, match="40x30: its centre square"):
        i2t(handlers, png_file(tmp_path / "wide.png", size=(40, 30)))
    # 1 + 16 image tokens + 2 = 19 prompt tokens; 512 - 19 = 493 left in the context.
    with pytest.warns(UserWarning, match="Answer limited to 493 tokens"):
        i2t(handlers, png_file(tmp_path / "sq.png"), max_new_tokens=512, temperature=0)


def test_image_to_text_rejects_bad_uploads_and_settings(pipeline, tmp_path):
    handlers = DemoHandlers(pipeline, DemoLimits(max_upload_bytes=2000, max_upload_pixels=64 * 64))
    text_file = tmp_path / "notes.png"
    text_file.write_text("this is not an image")
    Image.effect_noise((64, 64), 80).convert("RGB").save(tmp_path / "whole.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:600])
    Image.effect_noise((100, 100), 80).convert("RGB").save(tmp_path / "big.png")
    Image.new("L", (65, 65)).save(tmp_path / "many_pixels.png")  # tiny file, too many pixels
    good = png_file(tmp_path / "good.png")

    cases = [
        (lambda: i2t(handlers, None), "Upload an image first"),
        (lambda: i2t(handlers, {"path": None, "url": "data:image/png;base64,AAAA"}), "did not arrive as a file"),
        (lambda: i2t(handlers, str(text_file)), "not an image this demo can read"),
        (lambda: i2t(handlers, str(truncated)), "not an image this demo can read"),
        (lambda: i2t(handlers, str(tmp_path / "big.png")), r"MB; the limit is"),
        (lambda: i2t(handlers, str(tmp_path / "many_pixels.png")),
         r"\(65x65\) has more pixels than the limit of 4,096"),
        (lambda: i2t(handlers, good, "two <image> here"), "Remove <image>"),
        (lambda: i2t(handlers, good, max_new_tokens=0), r"Max new tokens must be in \[1, 512\]"),
        (lambda: i2t(handlers, good, temperature=-0.1), r"Temperature must be in \[0, 2\]"),
        (lambda: i2t(handlers, good, top_p=0), r"Top-p must be in \(0, 1\]"),
    ]
    for call, message in cases:
        with pytest.raises(gr.Error, match=message):
            call()
    assert isinstance(i2t(handlers, good), str)  # the same handlers still work


# ---------------------------------------------------------------------------- chat
def test_chat_continues_the_transcript_and_drops_old_turns_that_do_not_fit(handlers, pipeline):
    shown, history, box = handlers.chat("hello there", [], 8, 0, 0.9, 0)
    expected = pipeline.generate_text("User: hello there\nAssistant:", max_new_tokens=8, preset="greedy")
    assert box == "" and shown == history
    assert history == [{"role": "user", "content": "hello there"},
                       {"role": "assistant", "content": expected.split("\nUser:")[0].strip()}]
    _, history, _ = handlers.chat("and then?", history, 8, 0, 0.9, 0)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]

    long_turns = [{"role": r, "content": "zebra quartz " * 60} for r in ("user", "assistant") * 3]
    with pytest.warns(UserWarning, match="oldest .* messages were left out"):
        _, history, _ = handlers.chat("short question", long_turns, 4, 0, 0.9, 0)
    assert len(history) == len(long_turns) + 2  # the page keeps the whole conversation
    with pytest.raises(gr.Error, match="Enter a message first"):
        handlers.chat("  ", history, 4, 0, 0.9, 0)


def test_direct_calls_from_threads_take_turns_on_the_model(handlers):
    """Image generation swaps the LM head for a slice while it runs: concurrent calls must wait."""
    expected_images = [im.tobytes() for im, _ in t2i(handlers, num_images=2, seed=1)]
    expected_chat = handlers.chat("hi", [], 24, 0, 0.9, 0)[1]
    results, errors = [], []

    def run(call):
        try:
            for _ in range(3):
                results.append(call())
        except Exception as error:  # collected: an exception in a thread would pass silently
            errors.append(error)

    def images():
        return [im.tobytes() for im, _ in t2i(handlers, num_images=2, seed=1)]

    def chat():
        return handlers.chat("hi", [], 24, 0, 0.9, 0)[1]

    threads = [threading.Thread(target=run, args=(images,)), threading.Thread(target=run, args=(chat,))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(map(str, results)) == sorted(map(str, [expected_images] * 3 + [expected_chat] * 3))


# ---------------------------------------------------------------------------- through the queue
@pytest.fixture(scope="module")
def served(pipeline, tmp_path_factory):
    """The demo launched on a free local port; a gradio_client ``Client`` on it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        demo, url = serve(pipeline, block=False, quiet=True, limits=DemoLimits(max_upload_bytes=4000))
        yield Client(url, verbose=False, download_files=False)
        demo.close()


def test_queue_serves_concurrent_requests_in_turn(served, handlers):
    t2i_args = ("a cat", 2, 7.0, 0.9, 4096, 0.99)
    jobs = [served.submit(*t2i_args, seed, api_name="/text_to_image") for seed in (0, 10, 20, 30)]
    chats = [served.submit(f"hello {i}", 4, 0.7, 0.9, i, api_name="/chat") for i in range(2)]
    results = [job.result(timeout=120) for job in jobs]
    # One client is one session: the second chat turn continues the first one's history.
    chat_results = [job.result(timeout=120) for job in chats]
    assert sorted(len(messages) for messages, _ in chat_results) == [2, 4]
    assert all(box == "" for _, box in chat_results)
    for seed, gallery in zip((0, 10, 20, 30), results, strict=True):
        assert [item["caption"] for item in gallery] == [f"seed {seed}", f"seed {seed + 1}"]
    # What came through the queue is what the handler makes directly (the server is idle now:
    # these handlers share its model).
    expected = t2i(handlers, prompt="a cat", num_images=2, seed=20)
    served_images = [Image.open(item["image"]["path"] if isinstance(item["image"], dict) else item["image"])
                     for item in results[2]]
    assert [im.convert("RGB").tobytes() for im in served_images] == [im.tobytes() for im, _ in expected]


def test_queue_reports_bad_input_and_keeps_serving(served, tmp_path):
    text_file = tmp_path / "notes.png"
    text_file.write_text("this is not an image")
    Image.effect_noise((64, 64), 80).convert("RGB").save(tmp_path / "big.png")  # > 4000 bytes
    bad = [
        (lambda: served.predict("", 2, 7.0, 0.9, 4096, 0.99, 0, api_name="/text_to_image"), "Enter a prompt first"),
        (lambda: served.predict("a cat", 2, 70, 0.9, 4096, 0.99, 0, api_name="/text_to_image"),
         r"Guidance scale must be in \[1, 20\]"),
        (lambda: served.predict("a cat", 99, 7, 0.9, 4096, 0.99, 0, api_name="/text_to_image"),
         r"Number of images must be in \[1, 8\]"),
        (lambda: served.predict(handle_file(str(text_file)), "", 8, 0, 0.9, 0, api_name="/image_to_text"),
         "not an image this demo can read"),
        (lambda: served.predict(None, "", 8, 0, 0.9, 0, api_name="/image_to_text"), "Upload an image first"),
        (lambda: served.predict("", 8, 0.7, 0.9, 0, api_name="/chat"), "Enter a message first"),
    ]
    for call, message in bad:
        with pytest.raises(AppError, match=message):
            call()
    # Oversize uploads: gradio_client checks the page's max_file_size itself, and the server's
    # upload route refuses what a client that does not check sends anyway.
    with pytest.raises(ValueError, match="exceeds the maximum file size of 4000 bytes"):
        served.predict(handle_file(str(tmp_path / "big.png")), "", 8, 0, 0.9, 0, api_name="/image_to_text")
    with open(tmp_path / "big.png", "rb") as upload:
        response = httpx.post(served.src + "gradio_api/upload", files={"files": upload})
    assert response.status_code == 413

    good = png_file(tmp_path / "good.png")
    assert isinstance(served.predict(handle_file(good), "", 4, 0, 0.9, 0, api_name="/image_to_text"), str)
    assert len(served.predict("a dog", 1, 7, 0.9, 4096, 0.99, 0, api_name="/text_to_image")) == 1


# ---------------------------------------------------------------------------- the model's own settings
def _page_settings(demo) -> dict:
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    names = ("guidance", "temperature", "top-k", "top-p")
    return {**{name: by_id[f"t2i-{name}"].value for name in names}, "note": by_id["t2i-sampling-source"].value}


def _text_tab_settings(demo) -> list[float]:
    """Initial temperature and top-p of the Image To Text, then the Text To Text tab."""
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    return [by_id[f"{tab}-{name}"].value for tab in ("i2t", "t2t") for name in ("temperature", "top-p")]


def test_page_starts_at_the_models_own_settings_and_says_where_they_come_from(tiny_pipeline_factory, tmp_path):
    from unimodal.generation import SamplingConfig

    pipe = tiny_pipeline_factory(tie=True, image_size=4)  # its own: set_sampling changes the model
    liquid = _page_settings(build_demo(pipe))
    assert liquid == {"guidance": 7.0, "temperature": 0.9, "top-k": 4096, "top-p": 0.99,
                      "note": "Sampling settings: Liquid preset (guidance 7, temperature 0.9, top-k 4096, "
                              "top-p 0.99); the model has none."}
    assert _text_tab_settings(build_demo(pipe)) == [0.0, 0.9, 0.7, 0.9]  # greedy captions, a warmer chat

    pipe.set_sampling(SamplingConfig(guidance_scale=3.0, temperature=1.0))
    pipe.set_sampling(SamplingConfig(temperature=0.6, top_p=0.8), task="text")
    pipe.save_pretrained(tmp_path / "final")
    loaded = load_pipeline(tmp_path, dtype="float32", device="cpu")  # the run folder, as `unimodal demo` opens it
    demo = build_demo(loaded)
    own = _page_settings(demo)
    assert own == {"guidance": 3.0, "temperature": 1.0, "top-k": 0, "top-p": 1.0,
                   "note": "Sampling settings: from the model's generation_config.json (guidance 3, temperature 1, "
                           "top-k off, top-p 1)."}
    # The text tabs start at the model's text settings: temperature, top-p.
    assert _text_tab_settings(demo) == [0.6, 0.8, 0.6, 0.8]
    # Generating with the page's initial values is generating with the model's settings.
    page = [im for im, _ in DemoHandlers(loaded).text_to_image("a cat", 2, own["guidance"], own["temperature"],
                                                               own["top-k"], own["top-p"], 3)]
    default = loaded.generate_images("a cat", 2, seed=3, progress=False)
    assert [im.tobytes() for im in page] == [im.tobytes() for im in default]

    # A setting beyond the sliders' usual ends widens them instead of being refused by the page.
    pipe.set_sampling(SamplingConfig(guidance_scale=25.0))
    handlers = DemoHandlers(pipe)
    assert _page_settings(build_demo(pipe))["guidance"] == 25.0 and handlers.max_guidance == 25.0
    assert len(handlers.text_to_image("a cat", 1, 25.0, 1.0, 0, 1.0, 0)) == 1
