"""Chameleon and Anole (`ChameleonForConditionalGeneration`) as a unified base.

Sequence format (Chameleon's own: `transformers.ChameleonProcessor` puts an image between
``<racm3:break>`` and ``<eoss>``; Anole generates the same spans)::

    text-to-image   <s> caption <racm3:break> h*w image ids <eoss> </s>
    image-to-text   <s> <racm3:break> h*w image ids <eoss> caption </s>
    unconditional   <s> <racm3:break>

Image ids: the K tokens ``IMGIMG<code in letters>Z`` of the model's own vocabulary
(``config.vocabulary_map``, read through transformers' `ChameleonImageVocabularyMapping`): code
``c`` is the id of ``"IMGIMG" + c's digits as letters A-J + "Z"``. They fill one contiguous id
range (4..8195 in Chameleon-7b / Anole-7b's vocabulary; checked on load) but in the order of the
strings, not of the codes, so the vocabulary is an `ImageVocabulary` with a code -> id table.

VQ: Chameleon's VQ-GAN as our `VQGAN` (taming layout, key for key: `unimodal.vq.convert.from_taming`
of the release's ``tokenizer/vqgan.ckpt`` + ``vqgan.yaml``). transformers' `ChameleonVQVAE` in the
model folder holds only the encoder (no decoder), with the same parameter names; its codes equal
ours (tests/test_base_chameleon.py). The processor looks for the VQ in ``image_tokenizer/`` (a
converted `VQGAN`, what `save_pretrained` writes) or ``tokenizer/vqgan.ckpt`` (+ ``vqgan.yaml``,
converted on the fly).

Security: user text is encoded with ``split_special_tokens=True`` and, where it holds the letters
``IMGIMG``, in pieces split there, so no text can spell an image token.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

from ..errors import MissingInputError
from ..hub import push_folder_to_hub
from ..processor import IMAGE_PLACEHOLDER, IMAGE_TOKENIZER_SUBFOLDER, PROCESSOR_CONFIG_NAME, UnimodalProcessor
from ..vocab import ImageVocabulary
from ..vq.base import ImageTokenizerMixin
from . import UnifiedBase, register_base
from .chameleon_model import TRAINABLE_PARTS, apply_lora, image_decoder, load_model, save_model

logger = logging.getLogger(__name__)

NAME = "chameleon"
BOI_TOKEN, EOI_TOKEN = "<racm3:break>", "<eoss>"
IMAGE_TOKEN_PREFIX = "IMGIMG"
_SPLIT = re.compile(f"({IMAGE_TOKEN_PREFIX})")


def code_to_id_table(vocabulary_map: dict[str, int]) -> list[int]:
    """``table[c]`` = the id of image code ``c`` (transformers' ``img2bpe``), for codes 0..K-1."""
    img2bpe = ChameleonImageVocabularyMapping(vocabulary_map).img2bpe  # {code: id}
    if not img2bpe:
        raise ValueError(f"the vocabulary has no {IMAGE_TOKEN_PREFIX}...Z image tokens: not a Chameleon vocabulary")
    if sorted(img2bpe) != list(range(len(img2bpe))):
        raise ValueError(f"the {IMAGE_TOKEN_PREFIX} tokens do not cover the codes 0..{len(img2bpe) - 1}")
    return [int(img2bpe[c]) for c in range(len(img2bpe))]


class ChameleonUnimodalProcessor(UnimodalProcessor):
    """`UnimodalProcessor` in Chameleon's vocabulary and format (see the module docstring).

    Args:
        tokenizer: the model's own tokenizer (nothing is added to it).
        image_tokenizer: Chameleon's VQ-GAN as a `VQGAN` (or any tokenizer with K codes).
        code_to_id: the id of each code (`code_to_id_table` of ``config.vocabulary_map``).
    """

    base_name = NAME
    hub_commit_message = "Upload Chameleon UnimodalProcessor"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_tokenizer: ImageTokenizerMixin,
                 code_to_id: list[int] | torch.Tensor, *, boi_token: str = BOI_TOKEN, eoi_token: str = EOI_TOKEN,
                 image_placeholder: str = IMAGE_PLACEHOLDER):
        self.tokenizer, self.image_tokenizer = tokenizer, image_tokenizer
        self.boi_token, self.eoi_token = boi_token, eoi_token
        self.image_token_template = IMAGE_TOKEN_PREFIX + "{}Z"  # informative: codes are spelt in letters
        self.image_placeholder = image_placeholder
        self.boi_token_id, self.eoi_token_id = self._token_id(boi_token), self._token_id(eoi_token)
        self.vocab = ImageVocabulary.from_ids(code_to_id)  # raises if the ids are not one range
        if self.vocab.codebook_size != image_tokenizer.codebook_size:
            raise ValueError(f"the vocabulary has {self.vocab.codebook_size} image tokens but the image tokenizer "
                             f"has {image_tokenizer.codebook_size} codes: not Chameleon's VQ-GAN")
        if self.vocab.is_image(torch.tensor([self.boi_token_id, self.eoi_token_id])).any():
            raise ValueError(f"{boi_token}/{eoi_token} ids fall inside the image id range")
        self.bos_token_id, self.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        if self.bos_token_id is None or self.eos_token_id is None or self.pad_token_id is None:
            raise ValueError("a Chameleon tokenizer has <s>, </s> and <pad>; this one lacks one of them")

    def _token_id(self, token: str) -> int:
        idx = self.tokenizer.convert_tokens_to_ids(token)
        if not isinstance(idx, int) or self.tokenizer.convert_ids_to_tokens(idx) != token:
            raise ValueError(f"the tokenizer has no {token!r}: not a Chameleon tokenizer")
        return idx

    def _encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        """As the parent, but each piece is split after every ``IMGIMG`` first: an image token's
        string always starts with it, so no encoded part can be one (checked again by the parent)."""
        parts = [[p for p in _SPLIT.split(piece) if p] for piece in pieces]
        encoded = iter(super()._encode_pieces([p for ps in parts for p in ps]))
        return [[i for _ in ps for i in next(encoded)] for ps in parts]

    def image_decoder(self, model, vocab_slice, max_length, static_cache, compile, stats):
        """Generation hook (`generation.images`): the decoder that gives unmasked image logits."""
        return image_decoder(model, vocab_slice, max_length, static_cache, compile, stats)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """The model's tokenizer files, ``image_tokenizer/`` (the VQ-GAN) and processor_config.json
        (``"base": "chameleon"`` and the code -> id table, so the folder needs no model config)."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        self.image_tokenizer.save_pretrained(save_directory / IMAGE_TOKENIZER_SUBFOLDER)
        table = self.vocab.code_to_id if self.vocab.permuted else torch.arange(*self.image_token_range)
        config = {
            "base": NAME, "processor_class": type(self).__name__, "boi_token": self.boi_token,
            "eoi_token": self.eoi_token, "image_placeholder": self.image_placeholder,
            "image_tokenizer_subfolder": IMAGE_TOKENIZER_SUBFOLDER,
            "image_token_range": list(self.image_token_range), "boi_token_id": self.boi_token_id,
            "eoi_token_id": self.eoi_token_id, "grid_shape": list(self.grid_shape),
            "code_to_id": cast(torch.Tensor, table).tolist(),
        }
        (save_directory / PROCESSOR_CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
        if push_to_hub:
            kwargs.setdefault("commit_message", self.hub_commit_message)
            push_folder_to_hub(save_directory, kwargs.pop("repo_id", save_directory.name), **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, **hub_kwargs) -> ChameleonUnimodalProcessor:
        """From a folder `save_pretrained` wrote, or a Chameleon / Anole model folder (its
        ``config.json`` vocabulary map and the VQ-GAN found as the module docstring says)."""
        from transformers.utils import cached_file

        found = cached_file(str(path_or_repo), PROCESSOR_CONFIG_NAME, _raise_exceptions_for_missing_entries=False,
                            **hub_kwargs)
        config = json.loads(Path(found).read_text()) if found else {}
        tokenizer = AutoTokenizer.from_pretrained(path_or_repo, **hub_kwargs)
        if "code_to_id" in config:
            table = config["code_to_id"]
        else:
            vocabulary_map = AutoConfig.from_pretrained(path_or_repo, **hub_kwargs).vocabulary_map
            if not vocabulary_map:
                raise ValueError(f"{path_or_repo}: config.json has no vocabulary_map: not a Chameleon checkpoint")
            table = code_to_id_table(vocabulary_map)
        image_tokenizer = _find_vq(path_or_repo, config.get("image_tokenizer_subfolder", IMAGE_TOKENIZER_SUBFOLDER),
                                   **hub_kwargs)
        names = {k: config[k] for k in ("boi_token", "eoi_token", "image_placeholder") if k in config}
        return cls(tokenizer, image_tokenizer, table, **names)


def _find_vq(path_or_repo: str | os.PathLike, subfolder: str, **hub_kwargs) -> Any:
    """The VQ-GAN: ``subfolder/`` (a saved `VQGAN`), else the release's ``tokenizer/vqgan.ckpt``
    (+ ``vqgan.yaml``) converted in memory."""
    from transformers.utils import cached_file

    def get(name: str) -> str | None:
        return cached_file(str(path_or_repo), name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)

    if get(f"{subfolder}/config.json"):
        return AutoModel.from_pretrained(path_or_repo, subfolder=subfolder, **hub_kwargs).eval()
    ckpt = get("tokenizer/vqgan.ckpt")
    if ckpt:
        from ..vq.convert import from_taming

        conversion = from_taming(ckpt, get("tokenizer/vqgan.yaml"))
        for note in conversion.notes:
            logger.info("Chameleon VQ-GAN: %s", note)
        return conversion.model
    raise MissingInputError(
        f"{path_or_repo} holds no VQ-GAN: transformers' Chameleon checkpoint has the encoder only. Convert the "
        "release's tokenizer/vqgan.ckpt once (it ships with Anole-7b and the original Chameleon download): "
        f"`unimodal convert --format taming vqgan.ckpt {path_or_repo}/{subfolder} --config vqgan.yaml` "
        "(docs/bases/chameleon.md)")


def load_processor(path: str) -> ChameleonUnimodalProcessor:
    """`UnifiedBase.load_processor`: `ChameleonUnimodalProcessor.from_pretrained`."""
    return ChameleonUnimodalProcessor.from_pretrained(path)


CHAMELEON = UnifiedBase(
    name=NAME, model_types=("chameleon",), load_model=load_model, load_processor=load_processor,
    save_model=save_model, trainable_parts=TRAINABLE_PARTS, apply_lora=apply_lora,
)
register_base(CHAMELEON)

__all__ = ["CHAMELEON", "ChameleonUnimodalProcessor", "code_to_id_table", "load_processor"]
