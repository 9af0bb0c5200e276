"""`UnimodalProcessor`: text tokenizer + image tokenizer -> interleaved id sequences, and back.

The sequence format (training data, generation prompts and decoding all agree on it):

```
text-to-image   <bos> caption <boi> h*w image ids <eoi> <eos>
image-to-text   <bos> <boi> h*w image ids <eoi> caption <eos>
unconditional   <bos> <boi>            (the caption replaced by the empty string, for CFG)
```

Security: user text never yields control or image ids. Every piece of text is encoded with
``split_special_tokens=True`` (the literal string ``"<boi>"`` becomes ordinary text tokens) and
sequences are built by concatenating id lists, never by formatting control strings into text.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from PIL import Image
from transformers import AutoModel, AutoTokenizer, BatchEncoding, PreTrainedTokenizerBase
from transformers.utils import cached_file

from .hub import PushToHubMixin
from .images import center_crop_resize_pixels, pil_to_tensor, tensor_to_pil
from .segments import scan_segments
from .vocab import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN_TEMPLATE, ImageVocabulary
from .vq.base import ImageTokenizerMixin

logger = logging.getLogger(__name__)

PROCESSOR_CONFIG_NAME = "processor_config.json"
IMAGE_TOKENIZER_SUBFOLDER = "image_tokenizer"
IMAGE_PLACEHOLDER = "<image>"

ImagesInput = Image.Image | Sequence[Image.Image] | torch.Tensor
Segment = str | Image.Image | torch.Tensor


class UnimodalProcessor(PushToHubMixin):
    """Turns text with ``<image>`` placeholders plus images into LM ids, and LM ids back into
    text and images. Build it with `unimodal.add_image_tokens` or `from_pretrained`.

    Attributes:
        tokenizer: the extended text tokenizer.
        image_tokenizer: `VQGAN` or `PixelTokenizer`.
        vocab: `ImageVocabulary` (code <-> id).
        boi_token_id, eoi_token_id, bos_token_id, eos_token_id, pad_token_id: control ids. When
            the tokenizer has no bos token, ``<eos>`` doubles as ``<bos>`` (GPT-2/Qwen convention).
        num_image_tokens: ``h * w`` ids between ``<boi>`` and ``<eoi>``.
        grid_shape: ``(h, w)`` of one image's code grid.
        image_token_range: ``(first image id, last image id + 1)``; the range is contiguous.
    """

    hub_commit_message = "Upload UnimodalProcessor"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_tokenizer: ImageTokenizerMixin,
        *,
        boi_token: str = BOI_TOKEN,
        eoi_token: str = EOI_TOKEN,
        image_token_template: str = IMAGE_TOKEN_TEMPLATE,
        image_placeholder: str = IMAGE_PLACEHOLDER,
    ):
        self.tokenizer = tokenizer
        self.image_tokenizer = image_tokenizer
        self.boi_token, self.eoi_token = boi_token, eoi_token
        self.image_token_template = image_token_template
        self.image_placeholder = image_placeholder

        k = image_tokenizer.codebook_size
        first, last = image_token_template.format(0), image_token_template.format(k - 1)
        self.boi_token_id, self.eoi_token_id, offset, last_id = (
            self._token_id(t) for t in (boi_token, eoi_token, first, last)
        )
        if last_id != offset + k - 1:
            raise ValueError(
                f"image tokens are not contiguous: {first!r} has id {offset} but {last!r} has id "
                f"{last_id} (expected {offset + k - 1}); was the tokenizer extended for an image "
                f"tokenizer with codebook_size={k}?"
            )
        self.vocab = ImageVocabulary(offset, k)
        if self.vocab.is_image(torch.tensor([self.boi_token_id, self.eoi_token_id])).any():
            raise ValueError("<boi>/<eoi> ids fall inside the image id range")
        self.eos_token_id = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        self.bos_token_id = bos if bos is not None else self.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        if self.eos_token_id is None or self.pad_token_id is None:
            raise ValueError("the tokenizer needs an eos and a pad token; use add_image_tokens to add a pad")

    def _token_id(self, token: str) -> int:
        """Id of a control/image token, with an error that says what to do when it is missing."""
        idx = cast("int | None", self.tokenizer.convert_tokens_to_ids(token))  # an id for one token
        if idx is None or self.tokenizer.convert_ids_to_tokens(idx) != token:
            raise ValueError(
                f"the tokenizer has no token {token!r}; extend it with unimodal.add_image_tokens "
                "or load an extended one with UnimodalProcessor.from_pretrained"
            )
        return int(idx)

    # ------------------------------------------------------------------ shape facts
    @property
    def grid_shape(self) -> tuple[int, int]:
        return cast("tuple[int, int]", tuple(self.image_tokenizer.grid_shape))

    @property
    def num_image_tokens(self) -> int:
        return int(self.image_tokenizer.num_image_tokens)

    @property
    def image_token_range(self) -> tuple[int, int]:
        return self.vocab.offset, self.vocab.end

    # ------------------------------------------------------------------ encoding
    def _encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        """Encode user text pieces (one batched tokenizer call); control strings stay text."""
        if not pieces:
            return []
        out = self.tokenizer(pieces, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        # Defence in depth: a tokenizer that ignores split_special_tokens must fail loudly here.
        flat = torch.tensor([i for ids in out for i in ids], dtype=torch.long)
        leaked = self.vocab.is_image(flat) | (flat == self.boi_token_id) | (flat == self.eoi_token_id)
        if leaked.any():
            raise RuntimeError(
                f"{type(self.tokenizer).__name__} turned user text into control/image id "
                f"{int(flat[leaked][0])}: it does not honour split_special_tokens; use a fast "
                "(tokenizers-backed) tokenizer"
            )
        return out

    def encode_text(self, text: str) -> list[int]:
        """Ids of user text, with no special tokens added and none producible from the text."""
        return self._encode_pieces([text])[0]

    @torch.no_grad()
    def encode_images(self, images: ImagesInput) -> torch.Tensor:
        """PIL image(s) or pixels ``[B, 3, H, W]`` in [-1, 1] -> codes ``LongTensor[B, h, w]``.

        Images are centre-cropped and resized to ``image_tokenizer.config.image_size`` and encoded
        in one batch on the image tokenizer's device (the codes stay there).
        """
        size = int(self.image_tokenizer.config.image_size)
        if isinstance(images, torch.Tensor):
            pixels = center_crop_resize_pixels(images if images.ndim == 4 else images.unsqueeze(0), size)
        else:
            pixels = pil_to_tensor(images, size=size)
        tok = self.image_tokenizer
        return tok.encode(pixels.to(device=tok.device, dtype=tok.dtype))

    def image_span_ids(self, codes: torch.Tensor) -> list[int]:
        """``[<boi>, h*w image ids (row-major), <eoi>]`` for one code grid ``LongTensor[h, w]``."""
        if tuple(codes.shape) != self.grid_shape:
            raise ValueError(f"expected one code grid of shape {self.grid_shape}, got {tuple(codes.shape)}")
        return [self.boi_token_id, *self.vocab.codes_to_ids(codes.flatten()).tolist(), self.eoi_token_id]

    def text_to_image_ids(self, caption: str, codes: torch.Tensor | None = None) -> list[int]:
        """``<bos> caption <boi> ids <eoi> <eos>``; with ``codes=None`` the generation prompt
        ``<bos> caption <boi>``."""
        ids = [self.bos_token_id, *self.encode_text(caption)]
        if codes is None:
            return [*ids, self.boi_token_id]
        return [*ids, *self.image_span_ids(codes), self.eos_token_id]

    def image_to_text_ids(self, codes: torch.Tensor, caption: str | None = None) -> list[int]:
        """``<bos> <boi> ids <eoi> caption <eos>``; with ``caption=None`` the captioning prompt
        ``<bos> <boi> ids <eoi>``."""
        ids = [self.bos_token_id, *self.image_span_ids(codes)]
        if caption is None:
            return ids
        return [*ids, *self.encode_text(caption), self.eos_token_id]

    def unconditional_prompt_ids(self) -> list[int]:
        """``<bos> <boi>``: the text-to-image prompt of an empty caption, used both for training-
        time condition dropout and for the unconditional branch of classifier-free guidance."""
        return self.text_to_image_ids("", None)

    def __call__(
        self,
        text: str | list[str],
        images: ImagesInput | Sequence[Sequence[Image.Image]] | None = None,
        *,
        padding: bool = True,
        padding_side: str = "right",
        return_tensors: str | None = "pt",
        add_bos: bool = True,
        add_eos: bool = False,
    ) -> BatchEncoding:
        """Encode a batch of texts; each ``<image>`` becomes the image span of the next image.

        Args:
            text: one string or a batch of strings (a string is a batch of one; the output is
                always batched).
            images: the images for all placeholders in reading order across the batch: PIL
                image(s), a list of per-sample lists, or pixels ``[N, 3, H, W]``.
            padding: pad to the longest sequence with ``pad_token_id``.
            padding_side: ``"right"`` for training, ``"left"`` for batched generation.
            return_tensors: ``"pt"`` or ``None`` (lists).
            add_bos, add_eos: put ``<bos>``/``<eos>`` around each sequence.

        Returns:
            `BatchEncoding` with ``input_ids`` and ``attention_mask`` (``[B, T]``).
        """
        texts = [text] if isinstance(text, str) else list(text)
        if isinstance(images, Image.Image):
            images = [images]
        elif images is not None and not isinstance(images, torch.Tensor):
            images = [im for item in images for im in ([item] if isinstance(item, Image.Image) else item)]
        codes = self.encode_images(images) if images is not None and len(images) != 0 else ()
        sequences = self.interleaved_ids(texts, codes, add_bos=add_bos, add_eos=add_eos)
        return self.pad(sequences, padding_side, return_tensors, padding=padding)

    def split_placeholders(self, text: str) -> list[str]:
        """The text pieces around the ``<image>`` placeholders: ``n`` placeholders -> ``n + 1``
        pieces (image ``i`` goes between pieces ``i`` and ``i + 1``)."""
        return text.split(self.image_placeholder)

    def interleaved_ids(self, texts: Sequence[str], codes: Sequence[torch.Tensor] | torch.Tensor = (), *,
                        add_bos: bool = True, add_eos: bool = False) -> list[list[int]]:
        """One id list per text, each ``<image>`` replaced by the image span of the next code grid.

        ``codes`` are the grids (``[h, w]`` each, or one ``[N, h, w]`` tensor) for all placeholders
        in reading order across the batch; ``<bos>``/``<eos>`` go around each sequence when asked.
        """
        pieces = [self.split_placeholders(t) for t in texts]
        n_slots = sum(len(p) - 1 for p in pieces)
        if n_slots != len(codes):
            raise ValueError(
                f"the text has {n_slots} {self.image_placeholder} placeholders but "
                f"{len(codes)} images were given"
            )
        encoded = iter(self._encode_pieces([piece for p in pieces for piece in p]))  # one tokenizer call
        grids = iter(codes)
        sequences = []
        for p in pieces:
            ids = [self.bos_token_id] if add_bos else []
            for j in range(len(p)):
                if j:
                    ids += self.image_span_ids(next(grids).cpu())
                ids += next(encoded)
            sequences.append(ids + [self.eos_token_id] if add_eos else ids)
        return sequences

    def pad(self, sequences: Sequence[Sequence[int]], padding_side: str = "right",
            return_tensors: str | None = "pt", *, padding: bool = True) -> BatchEncoding:
        """Id lists -> ``input_ids`` and ``attention_mask`` ``[B, T]``, padded to the longest with
        ``pad_token_id`` (mask 0 there). ``"left"`` for batched generation (every row's last token
        in the last column), ``"right"`` for training; ``padding=False`` needs equal lengths."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        longest = max(len(s) for s in sequences)
        if not padding:
            if return_tensors is not None and any(len(s) != longest for s in sequences):
                raise ValueError("sequences have different lengths; pass padding=True to make a tensor")
            longest = 0
        ids, mask = [], []
        for s in sequences:
            fill = max(0, longest - len(s))
            pad, ones = [self.pad_token_id] * fill, [1] * len(s)
            ids.append(pad + list(s) if padding_side == "left" else list(s) + pad)
            mask.append([0] * fill + ones if padding_side == "left" else ones + [0] * fill)
        return BatchEncoding({"input_ids": ids, "attention_mask": mask}, tensor_type=return_tensors)

    # ------------------------------------------------------------------ decoding
    def _parse(self, ids: torch.Tensor, strict: bool) -> list[list[int] | torch.Tensor]:
        """Split one sequence into text id lists and code grids ``[h, w]``.

        <bos>/<eos>/<pad> are dropped. A valid span is <boi>, exactly h*w image ids, <eoi>. When not
        ``strict``, a full span missing only its <eoi> (generation cut at max length) is still
        decoded and every other malformed piece is dropped; each repair is logged.
        """
        n = self.num_image_tokens
        is_img = self.vocab.is_image(ids)
        opens = ids == self.boi_token_id
        # positions where text stops: <boi>, or a stray <eoi>/image id (errors)
        stops = opens | (ids == self.eoi_token_id) | is_img
        skip = (ids == self.bos_token_id) | (ids == self.eos_token_id) | (ids == self.pad_token_id)
        length = len(ids)

        def stray(stop: int) -> str:
            what = "<eoi> without <boi>" if int(ids[stop]) == self.eoi_token_id else "stray image token"
            return f"{what} (id {int(ids[stop])}) at position {stop}, outside any image span"

        def read_span(stop: int) -> tuple[torch.Tensor | None, int, str | None]:
            run = int(is_img[stop + 1 :].long().cumprod(0).sum())  # image ids right after <boi>
            end = stop + 1 + run
            closed = end < length and int(ids[end]) == self.eoi_token_id
            after = end + 1 if closed else end
            codes = self.vocab.ids_to_codes(ids[stop + 1 : end]).view(self.grid_shape) if run == n else None
            if run == n and closed:
                return codes, after, None
            if run < n:
                where = "the sequence ends" if end == length else f"id {int(ids[end])} at position {end}"
                return None, after, (f"image span at position {stop} has {run} image tokens before {where}; "
                                     f"expected {n}")
            if run > n:
                return None, after, (f"image span at position {stop} has {run} image tokens, expected {n}: "
                                     f"<eoi> missing at position {stop + 1 + n}")
            # strict=False: a complete grid that only lacks its <eoi> is still an image
            return codes, after, (f"unterminated image span at position {stop}: {n} image tokens but no <eoi> "
                                  f"at position {end}")

        return scan_segments(ids, opens, stops, skip, read_span, stray, strict, logger)

    @torch.no_grad()
    def batch_decode(
        self,
        sequences: torch.Tensor | Sequence[torch.Tensor | Sequence[int]],
        strict: bool = True,
        return_codes: bool = False,
    ) -> list[list[Segment]]:
        """Decode a batch of id sequences into lists of ``str`` and ``PIL.Image`` segments.

        All images of the batch go through the image tokenizer in one call. With ``return_codes``
        images are returned as code grids ``LongTensor[h, w]`` instead. Raises ``ValueError``
        naming the position of a malformed image span when ``strict``.
        """
        parsed = [self._parse(torch.as_tensor(s).long().flatten().cpu(), strict) for s in sequences]
        grids = [seg for segs in parsed for seg in segs if isinstance(seg, torch.Tensor)]
        texts = [seg for segs in parsed for seg in segs if not isinstance(seg, torch.Tensor)]
        decoded: Sequence[torch.Tensor | Image.Image] = grids
        if grids and not return_codes:
            tok = self.image_tokenizer
            decoded = tensor_to_pil(tok.decode(torch.stack(grids).to(tok.device)))
        strings = iter(self.tokenizer.batch_decode(
            texts, skip_special_tokens=False, clean_up_tokenization_spaces=False
        ))
        images = iter(decoded)
        # put decoded text and images back in sequence order
        return [
            [next(images) if isinstance(s, torch.Tensor) else next(strings) for s in segs] for segs in parsed
        ]

    def decode(
        self, ids: torch.Tensor | Sequence[int], strict: bool = True, return_codes: bool = False
    ) -> list[Segment]:
        """Decode one id sequence into ``str`` and ``PIL.Image`` segments (see `batch_decode`)."""
        return self.batch_decode([ids], strict=strict, return_codes=return_codes)[0]

    # ------------------------------------------------------------------ persistence
    def save_pretrained(
        self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs
    ) -> None:
        """Write the text tokenizer files, ``processor_config.json`` and the image tokenizer in
        ``image_tokenizer/``. With ``push_to_hub=True`` also upload the folder; ``repo_id``
        (default: the folder name) and other `push_to_hub` arguments go in ``kwargs``."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        self.image_tokenizer.save_pretrained(save_directory / IMAGE_TOKENIZER_SUBFOLDER)
        config = {
            "processor_class": type(self).__name__,
            "boi_token": self.boi_token, "eoi_token": self.eoi_token,
            "image_token_template": self.image_token_template, "image_placeholder": self.image_placeholder,
            "image_tokenizer_subfolder": IMAGE_TOKENIZER_SUBFOLDER,
            # informative (checked on load): ids and shapes of this tokenizer pair
            "image_token_range": list(self.image_token_range), "boi_token_id": self.boi_token_id,
            "eoi_token_id": self.eoi_token_id, "grid_shape": list(self.grid_shape),
        }
        self.write_config_and_push(save_directory, PROCESSOR_CONFIG_NAME, config, push_to_hub, kwargs)

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, **hub_kwargs) -> UnimodalProcessor:
        """Load from a folder or Hub repo written by `save_pretrained`. ``hub_kwargs`` (``revision``,
        ``token``, ``cache_dir``, ``local_files_only``) are passed to the Hub downloads. A folder of
        a unified base (processor_config.json ``"base"``) loads with that base's processor."""
        config_file = cached_file(path_or_repo, PROCESSOR_CONFIG_NAME, **hub_kwargs)  # raises if missing
        config = json.loads(Path(cast(str, config_file)).read_text())
        if config.get("base") is not None and cls is UnimodalProcessor:
            # a unified base's folder (Chameleon, Emu3, Janus): its own processor class rebuilds it
            from .bases import base_for

            base = base_for(path_or_repo, **hub_kwargs)
            if base is None:
                raise ValueError(f"{path_or_repo}: processor_config.json names base {config['base']!r}, "
                                 "which is not available")
            return base.load_processor(str(path_or_repo))
        subfolder = Path(path_or_repo) / config["image_tokenizer_subfolder"]
        if Path(path_or_repo).is_dir() and not (subfolder / "config.json").is_file():
            raise FileNotFoundError(
                f"{subfolder} holds no image tokenizer; save with UnimodalProcessor.save_pretrained"
            )
        tokenizer = AutoTokenizer.from_pretrained(path_or_repo, **hub_kwargs)
        image_tokenizer = AutoModel.from_pretrained(
            path_or_repo, subfolder=config["image_tokenizer_subfolder"], **hub_kwargs
        )
        processor = cls(tokenizer, image_tokenizer, boi_token=config["boi_token"], eoi_token=config["eoi_token"],
                        image_token_template=config["image_token_template"],
                        image_placeholder=config["image_placeholder"])
        if list(processor.image_token_range) != config["image_token_range"]:
            raise ValueError(
                f"{path_or_repo}: image ids are {processor.image_token_range} but processor_config.json "
                f"says {config['image_token_range']}; the tokenizer and image tokenizer do not match"
            )
        return processor

