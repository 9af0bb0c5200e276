"""Image codes as LM vocabulary: the id mapping (a leaf: nothing of ours above it).

After `unimodal.add_image_tokens` (in `unimodal.extend`) the id space of the LM is laid out as

```
[0, n_text)                  the text tokenizer's own tokens (unchanged)
[n_text, rows)               reserved fillers, only when the LM had more embedding rows than the
                             tokenizer had tokens (padded vocabs, e.g. Qwen); rows stay untouched
[rows, ...)                  <pad> (only if the tokenizer had none), <boi>, <eoi>,
                             then one token per code: ids offset .. offset + codebook_size - 1
[len(tokenizer), vocab_size) padding rows so vocab_size is a multiple of `pad_to_multiple_of`
```

so image ids are one contiguous range and code <-> id is a single add/subtract on a tensor.

Bases that keep their own vocabulary (Chameleon, Emu3: see `unimodal.bases`) also hold their K
image ids in one contiguous range, but in another order than the codes (Chameleon's ``IMGIMG..Z``
strings sort differently from the code numbers). For them `ImageVocabulary.from_ids` stores the
code -> id table (a permutation of the range) and its inverse: code <-> id is then one gather on
a tensor, and `is_image` stays the same range test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

BOI_TOKEN = "<boi>"
EOI_TOKEN = "<eoi>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN_TEMPLATE = "<img_{}>"
RESERVED_TOKEN_TEMPLATE = "<|unimodal_reserved_{}|>"


def _first_position(mask: torch.Tensor) -> tuple[int, ...] | int:
    """Index of the first True in ``mask`` (an int for 1-D masks, a tuple otherwise)."""
    pos = tuple(int(i) for i in mask.nonzero()[0])
    return pos[0] if len(pos) == 1 else pos


@dataclass(frozen=True)
class ImageVocabulary:
    """Maps image codes ``[0, codebook_size)`` to LM ids ``[offset, offset + codebook_size)``.

    Every method works on whole tensors (any shape, any device): no Python loop per token.
    Without ``code_to_id`` code ``c`` is id ``offset + c``; with it (see `from_ids`) code ``c`` is
    id ``code_to_id[c]``, a permutation of the same range.
    """

    offset: int
    codebook_size: int
    # LongTensor[K]: id of each code (a permutation of [offset, end)); None: the identity order
    code_to_id: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # LongTensor[K]: code of id offset + j; built from code_to_id
    _id_to_code: torch.Tensor | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.code_to_id is None:
            return
        table = torch.as_tensor(self.code_to_id).long().cpu().flatten()
        if len(table) != self.codebook_size:
            raise ValueError(f"code_to_id has {len(table)} entries for a codebook of {self.codebook_size}")
        inverse = torch.full((self.codebook_size,), -1, dtype=torch.long)
        inside = (table >= self.offset) & (table < self.end)
        if inside.all():
            inverse[table - self.offset] = torch.arange(self.codebook_size)
        if not inside.all() or (inverse < 0).any():
            raise ValueError(f"code_to_id is not a permutation of the ids [{self.offset}, {self.end})")
        if torch.equal(table, torch.arange(self.offset, self.end)):
            table = inverse = None  # type: ignore[assignment]  # the identity: keep the add/subtract fast path
        object.__setattr__(self, "code_to_id", table)
        object.__setattr__(self, "_id_to_code", inverse)

    @classmethod
    def from_ids(cls, ids: Sequence[int] | torch.Tensor) -> ImageVocabulary:
        """The vocabulary whose code ``c`` is ``ids[c]``. The ids must fill one contiguous range
        (any order); a set with holes raises ``ValueError`` naming the range it spans."""
        table = torch.as_tensor(ids).long().flatten()
        if len(table) == 0:
            raise ValueError("no image ids")
        lo, hi = int(table.min()), int(table.max()) + 1
        if hi - lo != len(table) or len(torch.unique(table)) != len(table):
            raise ValueError(f"the {len(table)} image ids are not one contiguous range (they span "
                             f"[{lo}, {hi}) with holes or repeats); ImageVocabulary needs one range")
        return cls(lo, len(table), table)

    @property
    def permuted(self) -> bool:
        """Whether codes map to ids through a table (not ``offset + code``)."""
        return self.code_to_id is not None

    @property
    def end(self) -> int:
        """One past the last image id."""
        return self.offset + self.codebook_size

    def token_strings(self, template: str = IMAGE_TOKEN_TEMPLATE) -> list[str]:
        """The tokenizer strings of all codes, in id order (``<img_0>``, ``<img_1>``, ...)."""
        return [template.format(code) for code in range(self.codebook_size)]

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        """BoolTensor of ``ids.shape``: True where the id is an image token."""
        ids = torch.as_tensor(ids)
        return (ids >= self.offset) & (ids < self.end)

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (any shape) -> LM ids of the same shape. Raises on codes outside the codebook."""
        codes = torch.as_tensor(codes)
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        bad = (codes < 0) | (codes >= self.codebook_size)
        if bad.any():
            pos = _first_position(bad)
            raise ValueError(
                f"code {int(codes[pos])} at position {pos} is outside [0, {self.codebook_size})"
            )
        if self.code_to_id is None:
            return codes.long() + self.offset
        return self.code_to_id.to(codes.device)[codes.long()]

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """LM ids (any shape) -> codes of the same shape. Raises on any non-image id."""
        ids = torch.as_tensor(ids)
        bad = ~self.is_image(ids)
        if bad.any():
            pos = _first_position(bad)
            raise ValueError(
                f"id {int(ids[pos])} at position {pos} is not an image token "
                f"(image ids are [{self.offset}, {self.end}))"
            )
        if self._id_to_code is None:
            return ids.long() - self.offset
        return self._id_to_code.to(ids.device)[ids.long() - self.offset]
