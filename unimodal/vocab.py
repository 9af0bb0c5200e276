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
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """

    offset: int
    codebook_size: int

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
        return codes.long() + self.offset

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
        return ids.long() - self.offset
