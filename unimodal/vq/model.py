"""`VQGAN`: the learned image tokenizer (encoder -> quantizer -> decoder).

Data flow for pixels ``[B, 3, H, W]`` in ``[-1, 1]`` and downsample factor ``f``::

    encoder -> [B, z_channels, H/f, W/f] -> quant_conv -> [B, embed_dim, h, w]
      -> quantize (config.quantizer: vq / fsq / lfq / simvq)
      -> codes [B, h, w] / quantised latents [B, embed_dim, h, w]
      -> post_quant_conv -> [B, z_channels, h, w] -> decoder -> [B, 3, H, W]

Parameter names follow taming-transformers' ``VQModel`` (``encoder.*``, ``quant_conv``,
``quantize.embedding``, ``post_quant_conv``, ``decoder.*``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .base import ImageTokenizerMixin
from .config import VQGANConfig
from .implicit import FSQuantizer, LookupFreeQuantizer
from .modules import Decoder, Encoder
from .quantizer import VectorQuantizer
from .simvq import SimVQuantizer

Quantizer = VectorQuantizer | FSQuantizer | LookupFreeQuantizer | SimVQuantizer
QUANTIZER_CLASSES = (VectorQuantizer, FSQuantizer, LookupFreeQuantizer, SimVQuantizer)


def build_quantizer(config: VQGANConfig) -> Quantizer:
    """The quantizer ``config.quantizer`` names, with its settings from ``config``."""
    window: dict[str, Any] = dict(usage_tokens_per_code=config.usage_tokens_per_code, usage_window=config.usage_window)
    if config.quantizer == "fsq":
        assert config.fsq_levels is not None  # VQGANConfig checks it
        return FSQuantizer(config.fsq_levels, **window)
    if config.quantizer == "lfq":
        return LookupFreeQuantizer(config.codebook_size, beta=config.beta, entropy_weight=config.lfq_entropy_weight,
                                   diversity_gamma=config.lfq_diversity_gamma,
                                   inv_temperature=config.lfq_inv_temperature, **window)
    if config.quantizer == "simvq":
        return SimVQuantizer(config.codebook_size, config.embed_dim, beta=config.beta, **window)
    return VectorQuantizer(
        config.codebook_size,
        config.embed_dim,
        beta=config.beta,
        use_l2_norm=config.use_l2_norm,
        ema_decay=config.ema_decay,
        kmeans_init=config.kmeans_init,
        kmeans_iters=config.kmeans_iters,
        dead_code_threshold=config.dead_code_threshold,
        **window,
    )


@dataclass
class VQGANOutput(ModelOutput):
    """What `VQGAN.forward` returns; the losses are fp32 scalars.

    Attributes:
        reconstruction: decoded pixels ``[B, 3, H, W]``.
        codes: ``LongTensor[B, h, w]``.
        quant_loss: ``codebook_loss + beta * commitment_loss``, the quantizer's term of the loss.
        codebook_loss: ``||sg[z] - e||^2`` (zero with EMA codebook updates).
        commitment_loss: ``||z - sg[e]||^2`` (unweighted).
        perplexity: ``exp(entropy)`` of the batch's code histogram; at most ``codebook_size``.
        usage: fraction of codes used over the quantizer's rolling window of training batches.
        latents: encoder latents after ``quant_conv``, ``[B, embed_dim, h, w]``, before quantisation.
        quantized: quantised latents ``[B, embed_dim, h, w]`` (straight-through to ``latents``).
    """

    reconstruction: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    quant_loss: torch.Tensor | None = None
    codebook_loss: torch.Tensor | None = None
    commitment_loss: torch.Tensor | None = None
    perplexity: torch.Tensor | None = None
    usage: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    quantized: torch.Tensor | None = None


class VQGAN(ImageTokenizerMixin, PreTrainedModel):
    """VQ-GAN image tokenizer: ``encode`` pixels to codes, ``decode`` codes to pixels.

    ``forward`` runs the whole autoencoder for training and returns a `VQGANOutput` with the
    reconstruction and every quantizer loss term; the GAN and perceptual terms live in
    `unimodal.vq.losses.VQGANLoss`.

    Example::

        vq = VQGAN(VQGANConfig(codebook_size=1024, image_size=64, ch=64, ch_mult=(1, 2, 2, 4)))
        codes = vq.encode(pixels)        # [B, 8, 8]
        images = vq.decode(codes)        # [B, 3, 64, 64]
    """

    config_class = VQGANConfig
    base_model_prefix = "vqgan"
    main_input_name = "pixel_values"
    # The codebook stays fp32 when loaded with dtype=torch.bfloat16: the argmin is the tokenizer.
    _keep_in_fp32_modules_strict = ["quantize"]
    _no_split_modules = ["ResnetBlock", "AttnBlock"]

    def __init__(self, config: VQGANConfig):
        super().__init__(config)
        arch: dict[str, Any] = dict(  # shared by the encoder and the decoder
            ch=config.ch,
            ch_mult=config.ch_mult,
            num_res_blocks=config.num_res_blocks,
            attn_resolutions=config.attn_resolutions,
            resolution=config.image_size,
            z_channels=config.z_channels,
            dropout=config.dropout,
            num_groups=config.num_groups,
            mid_attention=config.mid_attention,
        )
        self.encoder = Encoder(
            in_channels=config.in_channels,
            latent_convs=config.encoder_latent_convs,
            latent_res_blocks=config.latent_res_blocks,
            **arch,
        )
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.quantize = build_quantizer(config)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = Decoder(
            out_channels=config.out_channels,
            norm_type=config.decoder_norm,
            cond_channels=config.embed_dim,
            latent_res_blocks=config.latent_res_blocks,
            latent_convs=config.decoder_latent_convs,
            **arch,
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # PyTorch's default init, as taming trains with; transformers' guard around this call makes
        # it skip tensors that from_pretrained loaded.
        if isinstance(module, (nn.Conv2d, nn.GroupNorm, *QUANTIZER_CLASSES)):
            module.reset_parameters()
        elif isinstance(module, nn.BatchNorm2d):
            # transformers' init functions, not reset_parameters(): they leave loaded running stats be
            init.ones_(module.weight)
            init.zeros_(module.bias)
            # taming's BatchNorm layers track running stats
            assert module.running_mean is not None and module.running_var is not None
            assert module.num_batches_tracked is not None
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight, where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    # ------------------------------------------------------------------ pieces

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in [-1, 1] -> continuous latents ``[B, embed_dim, H/f, W/f]``."""
        self.check_pixels(pixels)
        return self.quant_conv(self.encoder(pixels.to(self.encoder.conv_in.weight.dtype)))

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        """Quantised latents ``[B, embed_dim, h, w]`` -> pixels ``[B, 3, h*f, w*f]``."""
        dtype = self.post_quant_conv.weight.dtype
        quantized = quantized.to(dtype)
        # spatially normalised decoders are also conditioned on the quantised latents themselves
        return self.decoder(self.post_quant_conv(quantized), quantized)

    # ------------------------------------------------------------------ tokenizer surface

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in [-1, 1] -> codes ``LongTensor[B, H/f, W/f]``.

        Pure inference: codebook statistics are not touched, in train or eval mode.
        """
        return self.quantize.lookup(self.encode_latents(pixels))

    @torch.no_grad()
    def code_vectors(self) -> torch.Tensor:
        """The codebook as used for lookup, fp32 ``[K, embed_dim]`` (for FSQ / LFQ the implicit
        codes' latents: every one of the ``K`` grid points / sign patterns)."""
        return self.quantize.codebook()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``LongTensor[B, h, w]`` in ``[0, codebook_size)`` -> pixels ``[B, 3, h*f, w*f]``.

        The output is the decoder's, not clamped; clamp to [-1, 1] before turning it into images.
        """
        self.check_codes(codes)
        return self.decode_latents(self.quantize.embed(codes.to(self.quant_conv.weight.device)))

    def forward(self, pixel_values: torch.Tensor) -> VQGANOutput:
        """Autoencode ``pixel_values [B, 3, H, W]``; updates codebook statistics in training mode."""
        latents = self.encode_latents(pixel_values)
        q = self.quantize(latents)
        return VQGANOutput(
            reconstruction=self.decode_latents(q.quantized),
            codes=q.codes,
            quant_loss=q.loss,
            codebook_loss=q.codebook_loss,
            commitment_loss=q.commitment_loss,
            perplexity=q.perplexity,
            usage=q.usage,
            latents=latents,
            quantized=q.quantized,
        )
