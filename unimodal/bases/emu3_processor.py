"""`Emu3Processor`: Emu3's own vocabulary and image layout behind the `UnimodalProcessor` surface.

Nothing is added to Emu3's vocabulary. Code ``c`` is the token ``<|visual token 00000c|>`` (six
digits) of Emu3's tokenizer, i.e. ``config.vocabulary_map[...]``; the K visual ids fill one
contiguous id range, in whatever order the tokenizer lists them, so `ImageVocabulary.from_ids`
holds the code -> id table. An image is laid out as Emu3 was trained on it (transformers'
``Emu3Processor`` and ``Emu3Model.get_image_tokens`` build the same ids):

```
<|image start|> "h*w" <|image token|> (w visual ids, <|extra_200|>) x h <|extra_201|> <|image end|>
 image start     size    `boi`           one row + end-of-line           end-of-frame    `eoi`
```

``boi_token_id`` is ``<|image token|>``: the id after which the first visual token comes (what
`sample_image_tokens` checks a prompt ends with); ``eoi_token_id`` is ``<|image end|>``. The size
header is ordinary text ("90*90" for Emu3-Gen's 720 x 720 images), the end-of-line token follows
every row (the generation decoder feeds it itself, see `emu3_decoder`).

Sequences:

```
text-to-image   <bos> caption <image span> <eos>
image-to-text   <bos> <image span> caption <eos>
prompt          <bos> caption <|image start|> "h*w" <|image token|>   (unconditional: caption "")
```

Security: user text is encoded with ``split_special_tokens=True``, so ``"<|visual token 000123|>"``
or ``"<|image start|>"`` typed by a user stays text; any control or visual id coming out of the
tokenizer anyway raises.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, cast

import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..images import tensor_to_pil
from ..processor import IMAGE_PLACEHOLDER, IMAGE_TOKENIZER_SUBFOLDER, PROCESSOR_CONFIG_NAME, UnimodalProcessor
from ..segments import scan_segments
from ..vocab import ImageVocabulary
from ..vq.base import ImageTokenizerMixin

logger = logging.getLogger(__name__)

BASE_NAME = "emu3"
VISUAL_TOKEN_TEMPLATE = "<|visual token {:06d}|>"
# Emu3's control tokens (its tokenizer's ``boi_token`` / ``image_wrapper_token`` / ``eof_token`` /
# ``eoi_token`` and the end-of-line token that Emu3ImageVocabularyMapping hard-codes).
IMAGE_START_TOKEN = "<|image start|>"
IMAGE_WRAPPER_TOKEN = "<|image token|>"
EOL_TOKEN = "<|extra_200|>"
EOF_TOKEN = "<|extra_201|>"
IMAGE_END_TOKEN = "<|image end|>"
# Emu3-Gen's default image: 720 x 720 pixels (its processor's image_area 518400), 90 x 90 codes.
DEFAULT_IMAGE_SIZE = 720


class Emu3Processor(UnimodalProcessor):
    """Emu3's tokenizer + an image tokenizer (the model's VQ model converted to `VQGAN`, which
    gives the same codes: see `unimodal.vq.convert.emu3`) with Emu3's sequence format.

    Args:
        tokenizer: Emu3's tokenizer (holding the ``<|visual token ......|>`` and control tokens).
        image_tokenizer: the image tokenizer (``config.image_size`` fixes the ``h x w`` grid).

    Attributes beyond `UnimodalProcessor`'s: ``image_start_token_id``, ``eol_token_id``,
    ``eof_token_id``, ``header_ids`` (the ids of the ``"h*w"`` size text).
    """

    hub_commit_message = "Upload Emu3Processor"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_tokenizer: ImageTokenizerMixin):
        self.tokenizer = tokenizer
        self.image_tokenizer = image_tokenizer
        self.image_placeholder = IMAGE_PLACEHOLDER
        self.boi_token, self.eoi_token = IMAGE_WRAPPER_TOKEN, IMAGE_END_TOKEN
        self.image_token_template = VISUAL_TOKEN_TEMPLATE
        k = image_tokenizer.codebook_size
        self.vocab = ImageVocabulary.from_ids([self._token_id(VISUAL_TOKEN_TEMPLATE.format(c)) for c in range(k)])
        self.image_start_token_id = self._token_id(IMAGE_START_TOKEN)
        self.boi_token_id = self._token_id(IMAGE_WRAPPER_TOKEN)
        self.eol_token_id = self._token_id(EOL_TOKEN)
        self.eof_token_id = self._token_id(EOF_TOKEN)
        self.eoi_token_id = self._token_id(IMAGE_END_TOKEN)
        self.bos_token_id, self.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        if None in (self.bos_token_id, self.eos_token_id, self.pad_token_id):
            raise ValueError("Emu3's tokenizer needs bos, eos and pad tokens (<|extra_203|>, <|extra_204|>, "
                             "<|endoftext|> in BAAI's release); is this an Emu3 tokenizer?")
        self.control_ids = torch.tensor([self.image_start_token_id, self.boi_token_id, self.eol_token_id,
                                         self.eof_token_id, self.eoi_token_id, self.bos_token_id,
                                         self.eos_token_id])
        if self.vocab.is_image(self.control_ids).any():
            raise ValueError("an Emu3 control token has an id inside the visual-token range")
        h, w = self.grid_shape
        self.header_ids = self.encode_text(f"{h}*{w}")  # Emu3's size header, e.g. "90*90"

    def _token_id(self, token: str) -> int:
        """Id of one of Emu3's own tokens; a clear error when the tokenizer lacks it."""
        idx = cast("int | None", self.tokenizer.convert_tokens_to_ids(token))
        if idx is None or self.tokenizer.convert_ids_to_tokens(idx) != token:
            raise ValueError(f"the tokenizer has no token {token!r}: Emu3Processor needs Emu3's own tokenizer "
                             "(BAAI/Emu3-Gen-hf or BAAI/Emu3-Chat-hf) with as many visual tokens as the VQ codebook")
        return int(idx)

    def _encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        """User text -> ids (one batched call); Emu3's control strings stay text."""
        if not pieces:
            return []
        out = self.tokenizer(pieces, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        flat = torch.tensor([i for ids in out for i in ids], dtype=torch.long)
        leaked = self.vocab.is_image(flat) | torch.isin(flat, self.control_ids)
        if leaked.any():
            raise RuntimeError(f"{type(self.tokenizer).__name__} turned user text into control/visual id "
                               f"{int(flat[leaked][0])}: it does not honour split_special_tokens; use a fast "
                               "(tokenizers-backed) tokenizer")
        return out

    # ------------------------------------------------------------------ sequences
    @property
    def span_length(self) -> int:
        """Ids of one image span: start, header, wrapper, ``h * (w + 1)`` rows, eof, end."""
        h, w = self.grid_shape
        return 2 + len(self.header_ids) + h * (w + 1) + 2

    @property
    def span_tail_len(self) -> int:
        """Ids after ``<|image token|>`` up to and including ``<|image end|>``: ``h * (w + 1) + 2``."""
        h, w = self.grid_shape
        return h * (w + 1) + 2

    @property
    def caption_suffix_len(self) -> int:
        """Ids between a caption and ``<|image token|>`` (``<|image start|>`` and the header): what
        t2i truncation must keep when it shortens a caption."""
        return 1 + len(self.header_ids)

    @property
    def span_control_ids(self) -> tuple[int, ...]:
        """Ids inside a span other than the visual ids, ``boi`` and ``eoi``: never text targets."""
        return self.image_start_token_id, self.eol_token_id, self.eof_token_id

    def _prompt_tail(self) -> list[int]:
        """``<|image start|> "h*w" <|image token|>``: what precedes the first visual id."""
        return [self.image_start_token_id, *self.header_ids, self.boi_token_id]

    def image_span_ids(self, codes: torch.Tensor) -> list[int]:
        """The Emu3 span (see the module doc) of one code grid ``LongTensor[h, w]``."""
        if tuple(codes.shape) != self.grid_shape:
            raise ValueError(f"expected one code grid of shape {self.grid_shape}, got {tuple(codes.shape)}")
        rows = self.vocab.codes_to_ids(codes.cpu().long())  # [h, w]
        eol = torch.full((rows.shape[0], 1), self.eol_token_id, dtype=torch.long)
        grid = torch.cat([rows, eol], 1).flatten().tolist()  # h * (w + 1): each row ends in <|extra_200|>
        return [*self._prompt_tail(), *grid, self.eof_token_id, self.eoi_token_id]

    def text_to_image_ids(self, caption: str, codes: torch.Tensor | None = None) -> list[int]:
        """``<bos> caption <span> <eos>``; with ``codes=None`` the generation prompt
        ``<bos> caption <|image start|> "h*w" <|image token|>`` (transformers' Emu3Processor with
        ``return_for_image_generation=True`` gives the same ids)."""
        ids = [self.bos_token_id, *self.encode_text(caption)]
        if codes is None:
            return [*ids, *self._prompt_tail()]
        return [*ids, *self.image_span_ids(codes), self.eos_token_id]

    def image_to_text_ids(self, codes: torch.Tensor, caption: str | None = None) -> list[int]:
        """``<bos> <span> caption <eos>``; with ``caption=None`` the prompt ``<bos> <span>``."""
        ids = [self.bos_token_id, *self.image_span_ids(codes)]
        return ids if caption is None else [*ids, *self.encode_text(caption), self.eos_token_id]

    # ------------------------------------------------------------------ decoding
    def _read_span(self, ids: torch.Tensor, start: int) -> tuple[torch.Tensor | None, int, str | None]:
        """Read the span opening at ``start`` (an ``<|image start|>``).

        Returns ``(codes [h, w] or None, position after what was consumed, problem or None)``. A
        span whose grid is complete but lacks its closing ``<|extra_201|> <|image end|>`` (cut
        at max length) returns its codes together with the problem.
        """
        h, w = self.grid_shape
        tail = self._prompt_tail()
        if ids[start:start + len(tail)].tolist() != tail:
            found = self.tokenizer.decode(ids[start + 1:start + len(tail) - 1].tolist())
            return None, start + 1, (f"image span at position {start} does not open with the header "
                                     f"{h}*{w}<|image token|> (found {found!r}); this processor reads {h}x{w} grids")
        pos = start + len(tail)
        grid = ids[pos:pos + h * (w + 1)]
        if len(grid) == h * (w + 1):
            rows = grid.view(h, w + 1)
            body, eols = rows[:, :w], rows[:, w]
            if self.vocab.is_image(body).all() and (eols == self.eol_token_id).all():
                codes = self.vocab.ids_to_codes(body)
                end = pos + h * (w + 1)
                if ids[end:end + 2].tolist() == [self.eof_token_id, self.eoi_token_id]:
                    return codes, end + 2, None
                return codes, end, f"image span at position {start} lacks <|extra_201|><|image end|> at {end}"
        bad = [i for i in range(len(grid)) if
               (i % (w + 1) == w) != (int(grid[i]) == self.eol_token_id) or
               (i % (w + 1) != w and not bool(self.vocab.is_image(grid[i])))]
        where = pos + (bad[0] if bad else len(grid))
        what = f"id {int(ids[where])}" if where < len(ids) else "the end of the sequence"
        return None, where, (f"image span at position {start}: {what} at position {where}, expected "
                             f"{h} rows of {w} visual ids each followed by <|extra_200|>")

    def _parse(self, ids: torch.Tensor, strict: bool) -> list[list[int] | torch.Tensor]:
        """Split one sequence into text id lists and code grids ``[h, w]`` (Emu3 spans).

        <bos>/<eos>/<pad> are dropped. When not ``strict`` a complete grid lacking only its
        closing tokens is still decoded and other malformed pieces are dropped, each logged.
        """
        starts = ids == self.image_start_token_id
        stray = self.vocab.is_image(ids) | torch.isin(ids, self.control_ids[1:5])  # inside-span ids
        skip = torch.isin(ids, torch.tensor([self.bos_token_id, self.eos_token_id, self.pad_token_id]))

        def stray_message(stop: int) -> str:
            return f"id {int(ids[stop])} at position {stop} belongs inside an image span but none is open"

        return scan_segments(ids, starts, starts | stray, skip, lambda stop: self._read_span(ids, stop),
                             stray_message, strict, logger)

    @torch.no_grad()
    def decode_image_ids(self, image_ids: torch.Tensor) -> list[Image.Image]:
        """Visual ids ``[N, h*w]`` (what `sample_image_tokens` returns: no end-of-line ids) -> N
        images in one image-tokenizer call. Raises ``ValueError`` on a non-visual id."""
        codes = self.vocab.ids_to_codes(torch.as_tensor(image_ids).long()).view(-1, *self.grid_shape)
        tok = self.image_tokenizer
        return tensor_to_pil(tok.decode(codes.to(tok.device)))

    def image_decoder(self, model, vocab_slice, max_length: int, static_cache: bool, compile: bool | str,
                      stats: Any = None):
        """The `KVDecoder` `sample_image_tokens` uses: it feeds ``<|extra_200|>`` after every row."""
        from .emu3_decoder import emu3_image_decoder

        return emu3_image_decoder(model, self, vocab_slice, max_length, static_cache, compile, stats)

    def generate_draw_layout(self, model):
        """How Emu3's ``generate`` draws (for ``rng="global"``): over its whole vocabulary, visual
        ids where they are, and once more for the forced end-of-line after every row of ``w``."""
        from ..generation.global_rng import DrawLayout

        width = int(model.get_output_embeddings().weight.shape[0])
        return DrawLayout(width=width, offset=self.image_token_range[0], forced_every=self.grid_shape[1])

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Write Emu3's tokenizer files, the image tokenizer in ``image_tokenizer/``, transformers'
        ``preprocessor_config.json`` (an ``Emu3ImageProcessor`` for [-1, 1] pixels, so
        ``transformers.Emu3Processor.from_pretrained`` loads the folder too) and
        ``processor_config.json`` with ``"base": "emu3"``."""
        from transformers import Emu3ImageProcessor

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        self.image_tokenizer.save_pretrained(folder / IMAGE_TOKENIZER_SUBFOLDER)
        size = int(self.image_tokenizer.config.image_size)
        Emu3ImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, min_pixels=size * size,
                           max_pixels=size * size, spatial_factor=8).save_pretrained(folder)
        config = {
            "processor_class": "Emu3Processor",  # transformers' class of that name loads this folder too
            "base": BASE_NAME,
            "image_size": size,
            "image_tokenizer_subfolder": IMAGE_TOKENIZER_SUBFOLDER,
            # informative (checked on load)
            "image_token_range": list(self.image_token_range),
            "boi_token_id": self.boi_token_id,
            "eoi_token_id": self.eoi_token_id,
            "grid_shape": list(self.grid_shape),
        }
        self.write_config_and_push(folder, PROCESSOR_CONFIG_NAME, config, push_to_hub, kwargs)

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, image_size: int | None = None,
                        **hub_kwargs) -> Emu3Processor:
        """Load a folder / Hub repo written by `save_pretrained`, or an Emu3 model folder in
        transformers' format (``BAAI/Emu3-Gen-hf``): then its ``vqmodel`` weights are converted
        to a `VQGAN` for ``image_size`` (default 720) pixel images."""
        from transformers.utils import cached_file

        from ..vq import VQGAN
        from ..vq.convert.emu3 import from_emu3

        config_file = cached_file(str(path_or_repo), PROCESSOR_CONFIG_NAME,
                                  _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        config = json.loads(Path(config_file).read_text()) if config_file else {}
        tokenizer = AutoTokenizer.from_pretrained(path_or_repo, **hub_kwargs)
        if config.get("base") == BASE_NAME and image_size in (None, config["image_size"]):
            image_tokenizer = VQGAN.from_pretrained(path_or_repo, subfolder=config["image_tokenizer_subfolder"],
                                                    **hub_kwargs)
        else:  # the model's own VQ (only the vqmodel.* shards are read)
            _check_normalisation(path_or_repo, **hub_kwargs)
            image_tokenizer = from_emu3(path_or_repo, image_size=image_size or DEFAULT_IMAGE_SIZE).model
        processor = cls(tokenizer, image_tokenizer.eval())
        saved = config.get("image_token_range") if config.get("base") == BASE_NAME else None
        if saved is not None and list(processor.image_token_range) != saved:
            raise ValueError(f"{path_or_repo}: visual ids are {processor.image_token_range} but "
                             f"processor_config.json says {saved}; the tokenizer and image tokenizer do not match")
        return processor


def _check_normalisation(path_or_repo: str | os.PathLike, **hub_kwargs) -> None:
    """Refuse a checkpoint whose ``preprocessor_config.json`` normalises pixels other than to
    [-1, 1] (mean = std = 0.5): the image tokenizer's codes would not be the ones Emu3 learnt."""
    from transformers.utils import cached_file

    found = cached_file(str(path_or_repo), "preprocessor_config.json", _raise_exceptions_for_missing_entries=False,
                        **hub_kwargs)
    if not found:
        return
    config = json.loads(Path(found).read_text())
    mean, std = config.get("image_mean", [0.5] * 3), config.get("image_std", [0.5] * 3)
    if config.get("do_normalize", True) and not all(abs(v - 0.5) < 1e-6 for v in [*mean, *std]):
        raise ValueError(f"{path_or_repo}: preprocessor_config.json normalises pixels with mean {mean} and std "
                         f"{std}; Emu3Processor feeds the VQ model pixels in [-1, 1] (mean = std = 0.5) only")
