"""Extending a causal LM for image tokens: new rows, their initialisation, counting and checking them.

`add_image_tokens` is the one call (vocabulary layout in `unimodal.vocab`); `layer_rows` is the
one way to count an embedding's rows (plain, PEFT-wrapped or ZeRO-3-partitioned) and
`check_compatibility` the one check that an LM, its processor and its data agree.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .processor import UnimodalProcessor
from .vocab import (
    BOI_TOKEN,
    EOI_TOKEN,
    IMAGE_TOKEN_TEMPLATE,
    PAD_TOKEN,
    RESERVED_TOKEN_TEMPLATE,
    ImageVocabulary,
)
from .vq.base import ImageTokenizerMixin


def unwrap_peft(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a PEFT wrapper (the model itself when not wrapped)."""
    get_base_model = getattr(model, "get_base_model", None)
    return cast(PreTrainedModel, get_base_model() if get_base_model is not None else model)


def base_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The base weight of a (possibly PEFT-wrapped) embedding or head."""
    while True:
        inner = getattr(layer, "base_layer", None)  # LoRA / trainable-tokens layers
        if inner is None:
            inner = getattr(layer, "original_module", None)  # PEFT wrappers
        if inner is None:
            return cast(torch.Tensor, layer.weight)
        layer = inner


def layer_rows(layer: torch.nn.Module) -> int:
    """Rows of a (possibly PEFT-wrapped, possibly ZeRO-3-partitioned) embedding or head: under
    ZeRO-3 the local ``weight`` is empty and DeepSpeed keeps the full shape in ``ds_shape``."""
    weight = base_weight(layer)
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def embedding_rows(model: torch.nn.Module) -> int:
    """Rows the LM can embed AND predict: the smaller of its input embedding and output head."""
    base = unwrap_peft(model)
    layers = [base.get_input_embeddings(), base.get_output_embeddings()]
    return min(layer_rows(layer) for layer in layers if layer is not None)


def _add_new_tokens(tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> int:
    """Add ``tokens`` as special tokens that must get fresh, consecutive ids; return the first.

    Special so that user text encoded with ``split_special_tokens=True`` can never produce them,
    and so that they survive ``save_pretrained``. A string the vocabulary already holds would keep
    its old id (a text id that BPE can produce), so that is an error.
    """
    first = len(tokenizer)
    tokenizer.add_tokens(tokens, special_tokens=True)
    got = cast("list[int | None]", tokenizer.convert_tokens_to_ids(tokens))  # a list for a list
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
        weight = cast(torch.Tensor, module.weight)  # [V, H]
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
) -> UnimodalProcessor:
    """Extend a causal LM and its text tokenizer with image-code tokens; return the processor.

    Adds ``<boi>``/``<eoi>`` (begin/end of image), one token per code of ``image_tokenizer``, and
    ``<pad>`` when the tokenizer has no pad token (batches need one; reusing ``<eos>`` would make
    padding indistinguishable from the end of a sample). The input and output embeddings are
    resized with transformers' ``resize_token_embeddings`` (tied and untied heads, gathering under
    DeepSpeed ZeRO-3), new rows initialised at the mean of the old ones when ``mean_resizing``.
    ``model.config`` afterwards records ``vocab_size``, ``pad_token_id``, ``boi_token_id``,
    ``eoi_token_id`` and a ``unimodal`` dict (control ids, image id range, grid), so a saved LM
    folder describes itself; ``model.generation_config`` the same three ids.

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
    if image_rows_init not in ("mean", "codebook"):
        raise ValueError(f"image_rows_init must be 'mean' or 'codebook', got {image_rows_init!r}")
    if not isinstance(image_tokenizer, ImageTokenizerMixin):
        raise TypeError(
            f"image_tokenizer must be a VQGAN or PixelTokenizer, got {type(image_tokenizer).__name__}"
        )
    rows = layer_rows(model.get_input_embeddings())
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
    # The control ids where generic tools look for them: top-level config attributes (the names
    # Chameleon-style configs use) and the generation config, which `generate` reads pad from.
    ids = {"boi_token_id": first, "eoi_token_id": first + 1, "pad_token_id": tokenizer.pad_token_id}
    for key, value in ids.items():
        setattr(model.config, key, value)
    if model.generation_config is not None:
        for key, value in ids.items():
            setattr(model.generation_config, key, value)
        # A config derived from the model config is saved with `_from_model_config: true`, and
        # transformers drops every extra field (boi/eoi) of such a file when loading it.
        model.generation_config._from_model_config = False
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


def new_token_ids(processor: UnimodalProcessor) -> list[int]:
    """Ids whose rows `add_image_tokens` created and training must teach: ``<boi>``, ``<eoi>``
    and the image tokens (one contiguous range; see `unimodal.vocab`)."""
    ids = {processor.boi_token_id, processor.eoi_token_id, *range(*processor.image_token_range)}
    return sorted(ids)


def check_compatibility(model: torch.nn.Module, processor: UnimodalProcessor, data=None,
                        num_checked: int = 256) -> None:
    """Raise a ``ValueError`` that says what to do when model, processor and data disagree:
    too few embedding rows for the processor's ids, an LM extended for other image/control ids,
    or stored image spans whose length is not the image tokenizer's ``h * w``."""
    rows = embedding_rows(model)
    needed = len(processor.tokenizer)
    if rows < needed:
        raise ValueError(f"the LM has {rows} embedding rows but the processor uses ids up to "
                         f"{needed - 1}; extend it with unimodal.add_image_tokens (the image tokenizer has "
                         f"codebook_size={processor.image_tokenizer.codebook_size})")
    recorded = getattr(unwrap_peft(model).config, "unimodal", None)
    if recorded:
        ours: dict[str, int | list[int]] = {
            "boi_token_id": processor.boi_token_id, "eoi_token_id": processor.eoi_token_id,
            "image_token_range": list(processor.image_token_range), "grid_shape": list(processor.grid_shape),
        }
        for key, value in ours.items():
            if list(np.atleast_1d(recorded.get(key))) != list(np.atleast_1d(value)):
                raise ValueError(f"the LM was extended with {key}={recorded.get(key)} but the processor has "
                                 f"{value}: they come from different checkpoints; load the processor saved "
                                 "with this LM")
    if data is None:
        return
    sample = data.select(range(min(num_checked, len(data))))["input_ids"]
    boi, eoi, hw = processor.boi_token_id, processor.eoi_token_id, processor.num_image_tokens
    inner = getattr(processor, "span_tail_len", hw + 1) - 1  # ids between <boi> and <eoi> (a base's may hold more)
    # Janus's image ids are virtual, above its text vocabulary: the data may hold ids up to that range's end.
    top = max(needed, processor.image_token_range[1])
    for i, ids in enumerate(sample):
        ids = np.asarray(ids)
        if ids.max() >= top:
            raise ValueError(f"sample {i} holds id {ids.max()} >= vocabulary size {top}")
        for start, end in zip(np.flatnonzero(ids == boi), np.flatnonzero(ids == eoi)):
            if end - start - 1 != inner:
                raise ValueError(f"sample {i} has an image span of {end - start - 1} tokens but the image "
                                 f"tokenizer makes {inner} ({processor.grid_shape}); the data was built for "
                                 "another grid: re-run tokenize_dataset with this image tokenizer")
