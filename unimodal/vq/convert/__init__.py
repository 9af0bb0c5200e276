"""Load pretrained VQ tokenizers of other projects into `VQGAN` (encode and decode).

=========  =========================================================  =====================
format     source                                                     function
=========  =========================================================  =====================
taming     taming / latent-diffusion / Chameleon ``.ckpt`` + yaml     `from_taming`
llamagen   LlamaGen VQ-16 / VQ-8 ``.pt``                              `from_llamagen`
janus      transformers ``JanusVQVAE`` (Janus, Janus-Pro)             `from_janus`
emu3       transformers ``Emu3VQVAE`` (2-D image path)                `from_emu3`
diffusers  diffusers ``VQModel`` (LDM VQ, MoVQ, aMUSEd)               `from_diffusers`
=========  =========================================================  =====================

Each returns a `Conversion` (the model and notes on what was dropped or differs); save it with
``conversion.save(out)`` and load it anywhere with ``VQGAN.from_pretrained(out)``. From the shell::

    unimodal convert --format taming vqgan.ckpt out/chameleon-vqgan --config vqgan.yaml

Checkpoints are only ever read with ``torch.load(weights_only=True)`` or safetensors; a pickle
that needs more raises `UnsafeCheckpointError` with the one-time command to extract its tensors.
"""

from __future__ import annotations

import os

from .common import Conversion, UnsafeCheckpointError, load_checkpoint
from .diffusers import from_diffusers
from .emu3 import fold_temporal_downsampling, from_emu3
from .llamagen import from_janus, from_llamagen
from .taming import from_taming

FORMATS = ("taming", "llamagen", "janus", "emu3", "diffusers")

__all__ = [
    "FORMATS", "Conversion", "UnsafeCheckpointError", "convert_checkpoint", "fold_temporal_downsampling",
    "from_diffusers", "from_emu3", "from_janus", "from_llamagen", "from_taming", "load_checkpoint",
]


def convert_checkpoint(
    fmt: str,
    src: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    config: str | os.PathLike | None = None,
    image_size: int | None = None,
) -> Conversion:
    """Convert ``src`` (a file, folder or Hub repo id, per ``fmt``) and, given ``out``, save it there.

    Args:
        fmt: the source's format, one of `FORMATS`.
        config: the training yaml; taming format only (where it is recommended).
        image_size: the resolution the tokenizer is used at; defaults to the source's own
            (taming ``resolution``, Janus ``num_patches * f``, diffusers ``sample_size``) or 256
            (taming without yaml, LlamaGen) / 512 (Emu3).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if config is not None and fmt != "taming":
        raise ValueError(f"--config is for the taming format (its yaml); {fmt} reads its own config")
    size = {} if image_size is None else {"image_size": image_size}
    if fmt == "taming":
        conversion = from_taming(src, config, **size)
    else:
        conversion = {"llamagen": from_llamagen, "janus": from_janus, "emu3": from_emu3,
                      "diffusers": from_diffusers}[fmt](src, **size)
    if out is not None:
        conversion.save(out)
    return conversion
