"""`VQGANConfig`: the architecture of the learned image tokenizer.

Field names follow taming-transformers' ``ddconfig`` (``ch``, ``ch_mult``, ``num_res_blocks``,
``attn_resolutions``, ``z_channels``, ``embed_dim``, ``dropout``) so that taming, Chameleon and
LlamaGen checkpoints map onto `VQGAN` by copying numbers from their configs. Training knobs (loss
weights, discriminator, LPIPS path) live in the recipe's `VQGANLossConfig`, not here.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

QUANTIZERS = ("vq", "fsq", "lfq", "simvq")
# The FSQ paper's levels for about 2^8 ... 2^16 codes (Mentzer et al. 2023, table 1), for messages and docs.
FSQ_LEVELS = {256: [8, 6, 5], 1000: [8, 5, 5, 5], 4375: [7, 5, 5, 5, 5], 15360: [8, 8, 8, 6, 5],
              64000: [8, 8, 8, 5, 5, 5]}


class VQGANConfig(PretrainedConfig):
    """Encoder/decoder and quantizer settings of a `VQGAN`.

    The defaults are LlamaGen's VQ-16 (f16, 16384 codes of 8 l2-normalised dims, ~70M params).

    Args:
        codebook_size: number of codes K (image tokens added to the LM vocabulary).
        image_size: training resolution in pixels; fixes the ``(image_size / f) ** 2`` tokens of a
            generated image and the resolutions ``attn_resolutions`` refers to.
        in_channels: image channels fed to the encoder.
        out_channels: image channels produced by the decoder.
        ch: base channel count of the first encoder level.
        ch_mult: channel multiplier per level; ``len(ch_mult) - 1`` stride-2 downsamplings, so the
            downsample factor is ``f = 2 ** (len(ch_mult) - 1)``.
        num_res_blocks: residual blocks per encoder level (the decoder uses one more, as taming).
        attn_resolutions: feature-map sides (in pixels of that level) that get self-attention after
            every residual block; the middle block always has one attention layer.
        z_channels: channels of the encoder output / decoder input.
        embed_dim: dimension of the codes. ``quant_conv`` projects ``z_channels -> embed_dim`` and
            ``post_quant_conv`` projects back, so ``embed_dim < z_channels`` gives LlamaGen-style
            low-dimensional (factorised) codes.
        dropout: dropout inside residual blocks.
        num_groups: GroupNorm groups; must divide every channel count (taming uses 32).
        beta: weight of the commitment loss.
        use_l2_norm: l2-normalise latents and codes before the lookup (cosine-similarity codes).
        ema_decay: if set, the codebook follows an exponential moving average of the latents
            assigned to each code instead of being trained by the codebook loss.
        kmeans_init: initialise the codebook with k-means on the first training batch (give it at
            least ``codebook_size`` latents, else codes repeat until dead-code restart spreads them).
        kmeans_iters: Lloyd iterations of that k-means.
        dead_code_threshold: a code picked fewer than this many times in the usage window (below)
            is restarted from a random latent of the batch; 0 disables. Codes are judged once a
            full window has passed since the start or since their last restart.
        usage_tokens_per_code: the window that codebook usage (logged in training) and the
            dead-code test are measured over, in training latents per code: the last
            ``usage_tokens_per_code * codebook_size`` latents of all processes together, so it
            means the same at any codebook size, batch size and process count (a code used as
            often as the others is picked ``usage_tokens_per_code`` times in it).
        usage_window: deprecated, for configs saved before ``usage_tokens_per_code``: if set, the
            window is the last this many training batches instead (too short for large codebooks:
            32 batches of 1024 latents restart codes used less than once per 2 latents per code).
        mid_attention: put self-attention in the middle blocks (taming); Chameleon's
            ``attn_type: none`` and diffusers' ``mid_block_add_attention=False`` leave it out.
        decoder_norm: ``"group"`` (taming) or ``"spatial"``: every decoder norm becomes MoVQ's
            SpatialNorm, modulated by the quantised latents (Emu3, diffusers ``norm_type="spatial"``).
        encoder_latent_convs: output widths of 3x3 conv + swish layers after the encoder's
            ``conv_out``; the last must be ``z_channels``. With ``latent_res_blocks`` and
            ``decoder_latent_convs`` this holds Emu3's temporal layers folded to one image frame.
        latent_res_blocks: BatchNorm residual blocks on the ``z_channels`` latents, after
            ``encoder_latent_convs`` in the encoder and first thing in the decoder.
        decoder_latent_convs: 3x3 conv + swish layers (``z_channels`` wide) after the decoder's
            latent residual blocks. The decoder's latent layers also process the quantised latents
            that condition spatial norms, so they need ``embed_dim == z_channels``.
        quantizer: ``"vq"`` (learned codebook: `VectorQuantizer`; ``use_l2_norm``, ``ema_decay``,
            ``kmeans_init`` and ``dead_code_threshold`` apply to it only), ``"fsq"`` (finite scalar
            quantization: ``codebook_size = prod(fsq_levels)``, ``embed_dim = len(fsq_levels)``),
            ``"lfq"`` (lookup-free binary codes: ``codebook_size = 2 ** embed_dim``) or ``"simvq"``
            (frozen codebook + learned linear map). See docs/tokenizer.md for which to pick.
        fsq_levels: values per latent channel for ``"fsq"``, each >= 3, e.g. ``[8, 5, 5, 5]`` (1000
            codes), ``[8, 8, 8, 6, 5]`` (15,360), ``[8, 8, 8, 5, 5, 5]`` (64,000).
        lfq_entropy_weight: weight of LFQ's entropy penalty.
        lfq_diversity_gamma: weight of the codebook entropy inside that penalty.
        lfq_inv_temperature: sharpness of the soft code assignment LFQ's entropies are taken on.
    """

    model_type = "unimodal_vqgan"

    def __init__(
        self,
        codebook_size: int = 16384,
        image_size: int = 256,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: list[int] | tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: list[int] | tuple[int, ...] = (16,),
        z_channels: int = 256,
        embed_dim: int = 8,
        dropout: float = 0.0,
        num_groups: int = 32,
        beta: float = 0.25,
        use_l2_norm: bool = True,
        ema_decay: float | None = None,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_threshold: int = 0,
        usage_tokens_per_code: float = 4.0,
        usage_window: int | None = None,
        mid_attention: bool = True,
        decoder_norm: str = "group",
        encoder_latent_convs: list[int] | tuple[int, ...] = (),
        latent_res_blocks: int = 0,
        decoder_latent_convs: int = 0,
        quantizer: str = "vq",
        fsq_levels: list[int] | tuple[int, ...] | None = None,
        lfq_entropy_weight: float = 0.1,
        lfq_diversity_gamma: float = 1.0,
        lfq_inv_temperature: float = 100.0,
        **kwargs,
    ):
        self.codebook_size = codebook_size
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.ch = ch
        self.ch_mult = list(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.attn_resolutions = list(attn_resolutions)
        self.z_channels = z_channels
        self.embed_dim = embed_dim
        self.dropout = dropout
        self.num_groups = num_groups
        self.beta = beta
        self.use_l2_norm = use_l2_norm
        self.ema_decay = ema_decay
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.dead_code_threshold = dead_code_threshold
        self.usage_tokens_per_code = usage_tokens_per_code
        self.usage_window = usage_window
        self.mid_attention = mid_attention
        self.decoder_norm = decoder_norm
        self.encoder_latent_convs = list(encoder_latent_convs)
        self.latent_res_blocks = latent_res_blocks
        self.decoder_latent_convs = decoder_latent_convs
        self.quantizer = quantizer
        self.fsq_levels = None if fsq_levels is None else list(fsq_levels)
        self.lfq_entropy_weight = lfq_entropy_weight
        self.lfq_diversity_gamma = lfq_diversity_gamma
        self.lfq_inv_temperature = lfq_inv_temperature
        super().__init__(**kwargs)
        self._check()

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def _check(self) -> None:
        f = self.downsample_factor
        if not self.ch_mult:
            raise ValueError("ch_mult needs at least one level, e.g. (1, 2, 2, 4)")
        if self.image_size % f:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by the downsample factor {f} "
                f"(2 ** (len(ch_mult) - 1)); pick a multiple of {f}"
            )
        channels = {self.ch * m for m in self.ch_mult}
        bad = sorted(c for c in channels if c % self.num_groups)
        if bad:
            raise ValueError(
                f"num_groups={self.num_groups} must divide every channel count; {bad} are not "
                f"divisible (channels are ch * ch_mult = {sorted(channels)})"
            )
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if not self.usage_tokens_per_code > 0:
            raise ValueError(f"usage_tokens_per_code must be > 0, got {self.usage_tokens_per_code}")
        if self.usage_window is not None and self.usage_window < 1:
            raise ValueError(f"usage_window (batches, deprecated) must be >= 1 or None, got {self.usage_window}; "
                             "leave it out to use usage_tokens_per_code")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be at least 2, got {self.codebook_size}")
        if self.decoder_norm not in ("group", "spatial"):
            raise ValueError(f"decoder_norm must be 'group' or 'spatial', got {self.decoder_norm!r}")
        if self.encoder_latent_convs and self.encoder_latent_convs[-1] != self.z_channels:
            raise ValueError(
                f"the last of encoder_latent_convs {self.encoder_latent_convs} must be z_channels="
                f"{self.z_channels}: those layers map the latents back to z_channels"
            )
        decoder_latent_layers = self.latent_res_blocks or self.decoder_latent_convs
        if self.decoder_norm == "spatial" and decoder_latent_layers and self.embed_dim != self.z_channels:
            raise ValueError(
                f"decoder latent layers also process the quantised latents that condition the spatial "
                f"norms (as in Emu3), so embed_dim ({self.embed_dim}) must equal z_channels ({self.z_channels})"
            )
        self._check_quantizer()

    def _check_quantizer(self) -> None:
        k, d = self.codebook_size, self.embed_dim
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.quantizer == "fsq":
            levels = self.fsq_levels
            if not levels or min(levels) < 3:
                raise ValueError(f"quantizer='fsq' needs fsq_levels, each >= 3 (e.g. {FSQ_LEVELS}), got {levels}")
            if math.prod(levels) != k or len(levels) != d:
                raise ValueError(f"fsq_levels {levels} make {math.prod(levels)} codes of {len(levels)} dims: set "
                                 f"codebook_size={math.prod(levels)} and embed_dim={len(levels)} (got {k} and {d})")
        if self.quantizer == "lfq" and k != 2 ** d:
            bits = max(1, round(math.log2(k)))
            raise ValueError(f"quantizer='lfq' has 2 ** embed_dim codes: with codebook_size={k} set embed_dim="
                             f"log2({k}); e.g. codebook_size={2 ** bits} and embed_dim={bits} (got embed_dim={d})")
