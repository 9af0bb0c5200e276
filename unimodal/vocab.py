"""Image codes as LM vocabulary: the id mapping and the one call that extends an LM.

After `add_image_tokens` the id space of the LM is laid out as

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
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .vq.base import ImageTokenizerMixin

if TYPE_CHECKING:  # the processor imports this module; importing it back here would be a cycle
    from .processor import UnimodalProcessor

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


def embedding_rows(model: PreTrainedModel) -> int:
    """Rows of the LM's input embedding matrix, also when ZeRO-3 has partitioned it (then the
    local ``weight`` is empty and DeepSpeed keeps the full shape in ``ds_shape``)."""
    weight = model.get_input_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def _add_new_tokens(tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> int:
    """Add ``tokens`` as special tokens that must get fresh, consecutive ids; return the first.

    Special so that user text encoded with ``split_special_tokens=True`` can never produce them,
    and so that they survive ``save_pretrained``. A string the vocabulary already holds would keep
    its old id (a text id that BPE can produce), so that is an error.
    """
    first = len(tokenizer)
    tokenizer.add_tokens(tokens, special_tokens=True)
    got = tokenizer.convert_tokens_to_ids(tokens)
    if got != list(range(first, first + len(tokens))):
        clash = next(t for t, i in zip(tokens, got) if i is None or i < first)
        raise ValueError(
            f"the tokenizer already has a token {clash!r}, so it cannot become a new control/image "
            "token; if this tokenizer was extended before, load it with "
            "UnimodalProcessor.from_pretrained, else pass other token strings to add_image_tokens"
        )
    return first


@torch.no_grad()
def init_rows_from_codes(model: PreTrainedModel, start: int, num_text: int, vectors: torch.Tensor,
                         seed: int = 0) -> None:
    """Set embedding rows ``start .. start+K`` to ``mean + std * normalise(vectors) @ P``.

    ``vectors [K, D]`` are the codes' meanings (codebook entries, palette colours); ``P [D, H]``
    a seeded Gaussian projection with variance 1/D, so inner products between codes carry over
    (Johnson-Lindenstrauss) while each row gets the per-entry spread of the first ``num_text``
    (text) rows. Applied to the input embedding and to an untied output head.
    """
    vectors = vectors.float().cpu()
    centred = vectors - vectors.mean(0)  # [K, D]
    centred = centred / centred.std().clamp_min(1e-8)  # unit variance per entry
    generator = torch.Generator().manual_seed(seed)
    heads = [model.get_input_embeddings()]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not heads[0].weight:
        heads.append(output)
    for module in heads:
        weight = module.weight  # [V, H]
        text = weight[:num_text].float()
        projection = torch.randn(vectors.shape[1], weight.shape[1], generator=generator) / vectors.shape[1] ** 0.5
        rows = text.mean(0) + text.std() * (centred @ projection)  # [K, H]
        weight[start:start + len(vectors)] = rows.to(weight.dtype)


def add_image_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    image_tokenizer: ImageTokenizerMixin,
    *,
    pad_to_multiple_of: int | None = 64,
    mean_resizing: bool = True,
    boi_token: str = BOI_TOKEN,
    eoi_token: str = EOI_TOKEN,
    pad_token: str = PAD_TOKEN,
    image_token_template: str = IMAGE_TOKEN_TEMPLATE,
    image_rows_init: str = "mean",
    seed: int = 0,
) -> "UnimodalProcessor":
    """Extend a causal LM and its text tokenizer with image-code tokens; return the processor.

    Adds ``<boi>``/``<eoi>`` (begin/end of image), one token per code of ``image_tokenizer``, and
    ``<pad>`` when the tokenizer has no pad token (batches need one; reusing ``<eos>`` would make
    padding indistinguishable from the end of a sample). The input and output embeddings are
    resized with transformers' ``resize_token_embeddings`` (tied and untied heads, gathering under
    DeepSpeed ZeRO-3), new rows initialised at the mean of the old ones when ``mean_resizing``.
    ``model.config`` afterwards records ``vocab_size``, ``pad_token_id`` and a ``unimodal`` dict
    (control ids, image id range, grid), so a saved LM folder describes itself.

    Args:
        model: any ``AutoModelForCausalLM`` model; modified in place.
        tokenizer: its fast text tokenizer; modified in place.
        image_tokenizer: a `VQGAN` or `PixelTokenizer` (anything with `ImageTokenizerMixin`).
        pad_to_multiple_of: round the embedding rows up to a multiple of this (None: no rounding).
        mean_resizing: mean-initialise new rows (else transformers' normal init).
        boi_token, eoi_token, pad_token, image_token_template: the token strings to add.
        image_rows_init: ``"mean"`` (as above) or ``"codebook"``: image-token rows are the mean
            row plus a random projection of ``image_tokenizer.code_vectors()`` scaled to the text
            rows' spread, so codes that look alike start with similar embeddings (both the input
            embedding and an untied head). Helps most when little data must teach the LM the
            codes (captioning small data sets); pretrained and built LMs alike.
        seed: seed of that projection.
    """
    from .processor import UnimodalProcessor  # here, not at the top: processor imports vocab

    if image_rows_init not in ("mean", "codebook"):
        raise ValueError(f"image_rows_init must be 'mean' or 'codebook', got {image_rows_init!r}")
    if not isinstance(image_tokenizer, ImageTokenizerMixin):
        raise TypeError(
            f"image_tokenizer must be a VQGAN or PixelTokenizer, got {type(image_tokenizer).__name__}"
        )
    rows = embedding_rows(model)
    if model.get_input_embeddings().weight.device.type == "meta":
        # A weightless LM (built on the meta device to learn the id layout only) has no mean.
        mean_resizing = False
    # Padded vocabs (the LM has more rows than the tokenizer has tokens, e.g. Qwen 151936 vs
    # 151665): we do not hand those rows to image tokens. They are part of the checkpoint and we
    # keep the LM's behaviour on its own ids exactly; instead reserved filler tokens take those
    # ids, so image ids start at len(tokenizer) AND on brand-new (mean-initialised) rows.
    if rows > len(tokenizer):
        _add_new_tokens(tokenizer, [RESERVED_TOKEN_TEMPLATE.format(i) for i in range(rows - len(tokenizer))])
    added_pad = tokenizer.pad_token_id is None
    if added_pad:
        tokenizer.add_special_tokens({"pad_token": pad_token})
    codes = ImageVocabulary(0, image_tokenizer.codebook_size).token_strings(image_token_template)
    first = _add_new_tokens(tokenizer, [boi_token, eoi_token, *codes])

    model.resize_token_embeddings(
        len(tokenizer), pad_to_multiple_of=pad_to_multiple_of, mean_resizing=mean_resizing
    )
    if added_pad:
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    if image_rows_init == "codebook" and model.get_input_embeddings().weight.device.type != "meta":
        init_rows_from_codes(model, first + 2, first, image_tokenizer.code_vectors(), seed)
    h, w = image_tokenizer.grid_shape
    model.config.unimodal = {
        "boi_token_id": first,
        "eoi_token_id": first + 1,
        "image_token_range": [first + 2, first + 2 + image_tokenizer.codebook_size],
        "grid_shape": [h, w],
        "image_tokenizer_type": image_tokenizer.config.model_type,
    }
    return UnimodalProcessor(
        tokenizer, image_tokenizer, boi_token=boi_token, eoi_token=eoi_token,
        image_token_template=image_token_template,
    )
