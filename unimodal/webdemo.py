"""A Liquid-style web demo over `UnimodalPipeline`: Text To Image, Image To Text, Text To Text.

    unimodal demo --model outputs/digits-demo/final  # or: python -m unimodal.cli demo --model ...

- Text To Image: N images at once in a gallery (click one to enlarge); Advanced Settings start
  at the model's own sampling settings (its ``generation_config.json``, see
  `unimodal.generation.model_sampling`), or at Liquid's (guidance 7, temperature 0.9, top-k 4096,
  top-p 0.99) when it has none; a line under the gallery says which. And a seed, and the
  decoding (token by token, or speculative Jacobi: fewer forward passes, same distribution).
- Image To Text: upload an image, optionally ask a question, get the caption / answer.
- Text To Text: chat (a plain ``User:`` / ``Assistant:`` transcript; see docs/webdemo.md).

Runs offline: no analytics (``analytics_enabled=False``), a theme whose fonts are served by the
app itself or come from the system (never Google Fonts), no CDN. All events share one queue slot
(``concurrency_id="model"``) so concurrent requests wait their turn on the one model instead of
competing for it. Every handler validates its inputs and reports problems in the page with
``gr.Error`` (the request fails, the server keeps running) or ``gr.Warning`` (it goes on).
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image, UnidentifiedImageError

from .generation import DECODINGS, SamplingConfig
from .generation.sampling import SAMPLING_SOURCE_MODEL
from .images import to_rgb
from .pipeline import UnimodalPipeline

MAX_GUIDANCE, MAX_TEMPERATURE = 20.0, 2.0  # slider ends (raised to a model's own setting above them)
MAX_TOP_K = 2**18  # the largest image codebooks in use (LFQ); more than the codebook = no top-k
# Low-resolution model outputs are upscaled by the browser: keep the pixels sharp.
CSS = ".pixelated img { image-rendering: pixelated; }"


@dataclass(frozen=True)
class DemoLimits:
    """What one request may ask for; larger requests are refused with a message in the page."""

    max_prompt_chars: int = 2000
    max_images: int = 8  # text-to-image images per request
    max_new_tokens: int = 512  # image-to-text / chat
    max_upload_bytes: int = 10 * 2**20
    max_upload_pixels: int = 40_000_000  # decoded width * height (decompression bombs)
    queue_size: int = 32  # waiting requests; more are refused ("queue is full")

    def __post_init__(self):
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DemoLimits.{name} must be a positive integer, got {value!r}")


def offline_theme() -> gr.themes.Base:
    """Gradio's default look with fonts the app serves itself or the system has: nothing is
    fetched from Google Fonts or any CDN."""
    return gr.themes.Default(
        font=[gr.themes.LocalFont("Source Sans Pro"), "ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=[gr.themes.LocalFont("IBM Plex Mono"), "ui-monospace", "Consolas", "monospace"],
    )


# ---------------------------------------------------------------------------- validation
def _refuse(message: str) -> gr.Error:
    """A bad-input error for the page: the user's mistake, so no server-side traceback."""
    return gr.Error(message, print_exception=False)


def _number(name: str, value: Any, low: float, high: float, *, integer: bool = False,
            low_open: bool = False) -> float | int:
    """``value`` as a number in ``[low, high]`` (``(low, high]`` with ``low_open``), else gr.Error."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _refuse(f"{name} must be a number in {interval}, got {value!r}") from None
    if not math.isfinite(number) or number < low or number > high or (low_open and number == low):
        raise _refuse(f"{name} must be in {interval}, got {value!r}")
    if integer:
        if not number.is_integer():
            raise _refuse(f"{name} must be a whole number, got {value!r}")
        return int(number)
    return number


class DemoHandlers:
    """The demo's event handlers; call them directly (tests, scripts) or through the page.

    Args:
        pipeline: the model to serve.
        limits: request limits.
    """

    def __init__(self, pipeline: UnimodalPipeline, limits: DemoLimits = DemoLimits()):
        self.pipeline = pipeline
        self.limits = limits
        # One generation at a time, also for direct calls from several threads: generation swaps
        # the LM head for a sliced view during image spans (KVDecoder), so it is not re-entrant.
        # In the page the shared queue slot already serialises requests.
        self._model_lock = threading.Lock()
        config = pipeline.model.config.get_text_config()
        # Positions the LM can attend over (None: no fixed limit known).
        self.context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        # The page's initial settings: the model's own, else the fallback presets (see `sampling_note`).
        self.image_sampling, self.image_sampling_source = pipeline.sampling("image")
        self.text_sampling, self.text_sampling_source = pipeline.sampling("text")
        self.max_guidance = max(MAX_GUIDANCE, self.image_sampling.guidance_scale)
        self.max_temperature = max(MAX_TEMPERATURE, self.image_sampling.temperature, self.text_sampling.temperature)

    def _text(self, name: str, text: Any, *, required: bool) -> str:
        text = "" if text is None else str(text)
        if required and not text.strip():
            raise _refuse(f"Enter a {name} first.")
        if len(text) > self.limits.max_prompt_chars:
            raise _refuse(f"The {name} is {len(text)} characters; the limit is {self.limits.max_prompt_chars}.")
        placeholder = self.pipeline.processor.image_placeholder
        if placeholder in text:
            raise _refuse(f"Remove {placeholder} from the {name}: it marks where images go in the model's input.")
        return text

    def _seed(self, seed: Any) -> int:
        return int(_number("Seed", seed, 0, 2**31 - 1, integer=True))  # an int already (integer=True)

    def _text_sampling(self, max_new_tokens: Any, temperature: Any, top_p: Any, prompt_len: int) -> dict:
        """generate_text keyword arguments; temperature 0 means greedy. Shortens max_new_tokens
        (with a warning) so prompt + answer fit the LM's context."""
        max_new = _number("Max new tokens", max_new_tokens, 1, self.limits.max_new_tokens, integer=True)
        temperature = _number("Temperature", temperature, 0, self.max_temperature)
        top_p = _number("Top-p", top_p, 0, 1, low_open=True)
        if self.context is not None:
            room = self.context - prompt_len
            if room < 1:
                raise _refuse(f"The input is {prompt_len} tokens; the model reads at most {self.context}. Shorten it.")
            if max_new > room:
                gr.Warning(f"Answer limited to {room} tokens: the model's context is {self.context} tokens.")
                max_new = room
        if temperature == 0:
            return dict(max_new_tokens=max_new, preset="greedy")
        return dict(max_new_tokens=max_new, preset="plain", temperature=temperature, top_p=top_p)

    def _read_image(self, image: Any) -> Image.Image:
        """An uploaded file (gradio's file payload, a path, or a PIL image) -> RGB PIL image."""
        if image is None:
            raise _refuse("Upload an image first.")
        if isinstance(image, Image.Image):
            return to_rgb(image)
        path = image.get("path") if isinstance(image, dict) else image
        if not path or not Path(path).is_file():
            raise _refuse("The upload did not arrive as a file; upload the image again.")
        size = Path(path).stat().st_size
        if size > self.limits.max_upload_bytes:
            raise _refuse(f"The file is {size / 2**20:.1f} MB; the limit is "
                           f"{self.limits.max_upload_bytes / 2**20:.0f} MB.")
        not_an_image = _refuse("That file is not an image this demo can read: upload a PNG, JPEG, "
                               "WebP, GIF, BMP or TIFF image.")
        try:
            opened = Image.open(path)  # reads the header only
        except Image.DecompressionBombError:  # PIL's own pixel limit, above ours
            raise self._too_many_pixels() from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise not_an_image from None
        with opened:
            if opened.width * opened.height > self.limits.max_upload_pixels:
                raise self._too_many_pixels(f" ({opened.width}x{opened.height})")
            try:
                opened.load()  # decodes: a truncated or corrupt file fails here
            except (OSError, SyntaxError, ValueError):
                raise not_an_image from None
            rgb = to_rgb(opened)
            return rgb.copy() if rgb is opened else rgb  # closing `opened` invalidates its pixels

    def _too_many_pixels(self, size: str = "") -> gr.Error:
        return _refuse(f"The image{size} has more pixels than the limit of {self.limits.max_upload_pixels:,}; "
                       "upload a smaller image.")

    # ------------------------------------------------------------------------ handlers
    def text_to_image(self, prompt: Any, num_images: Any, guidance_scale: Any, temperature: Any,
                      top_k: Any, top_p: Any, seed: Any, decoding: Any = "token") -> list[tuple[Image.Image, str]]:
        """``num_images`` images for ``prompt``; returns (image, "seed N") pairs for a gallery.
        Image ``i`` uses seed ``seed + i``: generate with that seed and 1 image to get it alone.
        ``decoding``: ``"token"`` or ``"jacobi"`` (speculative Jacobi decoding: fewer forward
        passes, the same distribution; a seed gives other images than token by token)."""
        if decoding not in DECODINGS:
            raise _refuse(f"Decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
        prompt = self._text("prompt", prompt, required=True)
        num_images = _number("Number of images", num_images, 1, self.limits.max_images, integer=True)
        guidance_scale = _number("Guidance scale", guidance_scale, 1, self.max_guidance)
        temperature = _number("Temperature", temperature, 0, self.max_temperature, low_open=True)
        top_k = _number("Top-k", top_k, 0, MAX_TOP_K, integer=True)
        top_p = _number("Top-p", top_p, 0, 1, low_open=True)
        seed = self._seed(seed)
        processor = self.pipeline.processor
        # <bos> prompt <boi> + the span's ids (h*w, or a unified base's span_tail_len) must fit.
        tail = getattr(processor, "span_tail_len", processor.num_image_tokens)
        length = len(processor.text_to_image_ids(prompt)) + tail
        if self.context is not None and length > self.context:
            raise _refuse(f"The prompt plus {tail} image tokens is {length} tokens; "
                           f"the model reads at most {self.context}. Shorten the prompt.")
        with self._model_lock:
            images = self.pipeline.generate_images(
                prompt, num_images, guidance_scale=guidance_scale, temperature=temperature,
                top_k=top_k, top_p=top_p, seed=seed, progress=False, decoding=decoding,
            )
        return [(image, f"seed {seed + i}") for i, image in enumerate(images)]

    def image_to_text(self, image: Any, question: Any, max_new_tokens: Any, temperature: Any,
                      top_p: Any, seed: Any) -> str:
        """Caption ``image`` (empty question) or answer a question about it."""
        question = self._text("question", question, required=False)
        seed = self._seed(seed)
        processor = self.pipeline.processor
        # <bos> <boi> h*w image ids <eoi> question (a unified base's span: its span_length ids)
        span = getattr(processor, "span_length", processor.num_image_tokens + 2)
        prompt_len = 1 + span + len(processor.encode_text(question))
        sampling = self._text_sampling(max_new_tokens, temperature, top_p, prompt_len)
        picture = self._read_image(image)
        if picture.width != picture.height:
            gr.Warning(f"The image is {picture.width}x{picture.height}: its centre square is what the model sees.")
        with self._model_lock:
            answer = self.pipeline.generate_text(question, images=[picture], seed=seed, **sampling)
        if not answer.strip():
            gr.Warning("The model produced no text (it ended the answer at once).")
        return answer

    def chat(self, message: Any, history: list[dict] | None, max_new_tokens: Any, temperature: Any,
             top_p: Any, seed: Any) -> tuple[list[dict], list[dict], str]:
        """One chat turn; returns (chatbot messages, the same for the history state, "" for the
        message box). ``history`` is a list of ``{"role": "user" | "assistant", "content": str}``."""
        message = self._text("message", message, required=True)
        seed = self._seed(seed)
        history = list(history or [])
        processor = self.pipeline.processor
        turns = [*history, {"role": "user", "content": message}]
        prompt = _transcript(turns)
        # Drop the oldest turns (two messages at a time) until the prompt leaves room to answer.
        while self.context is not None and len(turns) > 1 and \
                len(processor.encode_text(prompt)) + 1 >= self.context:
            turns = turns[2:]
            prompt = _transcript(turns)
        if len(turns) < len(history) + 1:
            gr.Warning(f"The conversation is longer than the model's context: the oldest "
                       f"{len(history) + 1 - len(turns)} messages were left out.")
        sampling = self._text_sampling(max_new_tokens, temperature, top_p, 1 + len(processor.encode_text(prompt)))
        with self._model_lock:
            answer = self.pipeline.generate_text(prompt, seed=seed, **sampling)
        answer = answer.split("\nUser:")[0].strip()  # the model may go on to write the next turn
        if not answer:
            gr.Warning("The model produced no text (it ended the answer at once).")
        history = [*history, {"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        return history, history, ""


def sampling_note(sampling: SamplingConfig, source: str) -> str:
    """The line the page shows about the text-to-image settings it starts with."""
    values = (f"guidance {sampling.guidance_scale:g}, temperature {sampling.temperature:g}, "
              f"top-k {sampling.top_k or 'off'}, top-p {sampling.top_p:g}")
    if source == SAMPLING_SOURCE_MODEL:
        return f"Sampling settings: from the model's generation_config.json ({values})."
    name = source.removeprefix("preset ").capitalize()
    return f"Sampling settings: {name} preset ({values}); the model has none."


def _transcript(turns: list[dict]) -> str:
    """``User: ...`` / ``Assistant: ...`` lines ending in ``Assistant:`` for the model to continue."""
    names = {"user": "User", "assistant": "Assistant"}
    lines = [f"{names[t['role']]}: {t['content']}" for t in turns]
    return "\n".join([*lines, "Assistant:"])


# ---------------------------------------------------------------------------- page
def build_demo(pipeline: UnimodalPipeline, limits: DemoLimits = DemoLimits(),
               title: str = "unimodal demo") -> gr.Blocks:
    """The web app (queued; launch it with `serve`, which adds the offline theme and limits).

    API names (for ``gradio_client``): ``/text_to_image``, ``/image_to_text``, ``/chat``.
    """
    handlers = DemoHandlers(pipeline, limits)
    # preprocess=False: the handlers get the raw values and do all the validation themselves, so
    # every bad input gets one named message (gradio's own range check does not name the setting).
    queued = dict(concurrency_id="model", concurrency_limit=1, preprocess=False)
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\nA unified text + image-token language model: "
                    "text to image, image to text and text to text with one LM.")
        with gr.Tab("Text To Image", id="t2i"):
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", placeholder="Describe the image", scale=5,
                                    max_length=limits.max_prompt_chars, elem_id="t2i-prompt")
                generate = gr.Button("Generate", variant="primary", scale=1, elem_id="t2i-generate")
            # No "share" button: it posts to Hugging Face Spaces discussions.
            gallery = gr.Gallery(label="Images (click to enlarge)", columns=4, format="png", interactive=False,
                                 object_fit="contain", buttons=["download", "download_all", "fullscreen"],
                                 elem_id="t2i-gallery", elem_classes="pixelated")
            start = handlers.image_sampling  # the model's settings, else Liquid's
            gr.Markdown(sampling_note(start, handlers.image_sampling_source), elem_id="t2i-sampling-source")
            with gr.Accordion("Advanced Settings", open=False, elem_id="t2i-advanced"):
                with gr.Row():
                    num_images = gr.Slider(1, limits.max_images, value=min(4, limits.max_images), step=1,
                                           label="Number of images", elem_id="t2i-num-images")
                    guidance = gr.Slider(1, handlers.max_guidance, value=start.guidance_scale, step=0.5,
                                         label="Guidance scale", elem_id="t2i-guidance")
                    image_seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="t2i-seed")
                with gr.Row():
                    image_temperature = gr.Slider(min(0.05, start.temperature), handlers.max_temperature,
                                                  value=start.temperature, step=0.05, label="Temperature",
                                                  elem_id="t2i-temperature")
                    top_k = gr.Slider(0, max(MAX_TOP_K, start.top_k or 0), value=start.top_k or 0, step=1,
                                      label="Top-k (0: off)", elem_id="t2i-top-k")
                    image_top_p = gr.Slider(min(0.01, start.top_p), 1, value=start.top_p, step=0.01, label="Top-p",
                                            elem_id="t2i-top-p")
                # Jacobi: several image tokens per forward pass, sampled from the same distribution.
                decoding = gr.Radio([("Token by token", "token"), ("Speculative Jacobi", "jacobi")], value="token",
                                    label="Decoding", elem_id="t2i-decoding")
            gr.on([generate.click, prompt.submit], handlers.text_to_image,
                  [prompt, num_images, guidance, image_temperature, top_k, image_top_p, image_seed, decoding],
                  gallery, api_name="text_to_image", **queued)

        with gr.Tab("Image To Text", id="i2t"):
            with gr.Row():
                with gr.Column():
                    upload = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"],
                                      elem_id="i2t-image")
                    question = gr.Textbox(label="Question (empty: caption the image)",
                                          max_length=limits.max_prompt_chars, elem_id="i2t-question")
                    describe = gr.Button("Describe", variant="primary", elem_id="i2t-describe")
                answer = gr.Textbox(label="Answer", lines=6, interactive=False, elem_id="i2t-answer")
            i2t_settings = _text_settings(limits, handlers, "i2t", default_temperature=0.0)
            gr.on([describe.click, question.submit], handlers.image_to_text,
                  [upload, question, *i2t_settings], answer, api_name="image_to_text", **queued)

        with gr.Tab("Text To Text", id="t2t"):
            chatbot = gr.Chatbot(label="Chat", height=360, buttons=["copy", "copy_all"], elem_id="t2t-chat")
            history = gr.State([])
            with gr.Row():
                message = gr.Textbox(label="Message", scale=5, max_length=limits.max_prompt_chars,
                                     elem_id="t2t-message")
                send = gr.Button("Send", variant="primary", scale=1, elem_id="t2t-send")
            clear = gr.Button("Clear conversation", variant="secondary")
            chat_settings = _text_settings(limits, handlers, "t2t", default_temperature=0.7)
            gr.on([send.click, message.submit], handlers.chat, [message, history, *chat_settings],
                  [chatbot, history, message], api_name="chat", **queued)
            clear.click(lambda: ([], [], ""), None, [chatbot, history, message], queue=False, api_visibility="private")
    demo.queue(default_concurrency_limit=1, max_size=limits.queue_size)
    return demo


def _text_settings(limits: DemoLimits, handlers: DemoHandlers, tab: str,
                   default_temperature: float) -> list[gr.components.Component]:
    """Advanced Settings of a text-output tab (elem ids ``<tab>-temperature``, ``<tab>-top-p``):
    max new tokens, temperature, top-p, seed. They start
    at the model's text settings when it has them, else at ``default_temperature`` and top-p 0.9."""
    temperature, top_p = default_temperature, 0.9
    if handlers.text_sampling_source == SAMPLING_SOURCE_MODEL:
        own = handlers.text_sampling
        temperature, top_p = (own.temperature if own.do_sample else 0.0), own.top_p
    with gr.Accordion("Advanced Settings", open=False):
        with gr.Row():
            max_new = gr.Slider(1, limits.max_new_tokens, value=min(64, limits.max_new_tokens), step=1,
                                label="Max new tokens")
            temp = gr.Slider(0, handlers.max_temperature, value=temperature, step=0.05, label="Temperature (0: greedy)",
                             elem_id=f"{tab}-temperature")
            top_p_slider = gr.Slider(min(0.01, top_p), 1, value=top_p, step=0.01, label="Top-p",
                                     elem_id=f"{tab}-top-p")
            seed = gr.Number(0, label="Seed", precision=0, minimum=0)
    return [max_new, temp, top_p_slider, seed]


def serve(pipeline: UnimodalPipeline, *, host: str = "127.0.0.1", port: int | None = None,
          limits: DemoLimits = DemoLimits(), block: bool = True, quiet: bool = False) -> tuple[gr.Blocks, str]:
    """Build the demo and serve it on ``host:port`` (``port=None``: the first free one from 7860).

    With ``block=False`` returns at once (the server runs in a thread; stop it with
    ``demo.close()``). Returns the demo and its local URL.
    """
    demo = build_demo(pipeline, limits)
    _, url, _ = demo.launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, share=False, quiet=quiet,
        max_file_size=limits.max_upload_bytes, theme=offline_theme(), css=CSS,
    )
    return demo, url


def load_pipeline(model: str | os.PathLike, dtype: str = "float32", device: str | None = None) -> UnimodalPipeline:
    """`UnimodalPipeline.from_pretrained` with the dtype and device given as strings."""
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"dtype must be a torch dtype name such as float32 or bfloat16, got {dtype!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return UnimodalPipeline.from_pretrained(model, dtype=getattr(torch, dtype), device=device)
