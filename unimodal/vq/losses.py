"""VQ-GAN training losses: reconstruction, perceptual (LPIPS), PatchGAN adversarial, LeCAM.

The lecture's step from VQ-VAE to VQ-GAN: besides pixel reconstruction and the quantizer's
codebook/commitment terms, a patch discriminator judges local realism and a perceptual distance
compares deep features, which keeps reconstructions sharp. `VQGANLoss` holds the discriminator
and the (frozen) LPIPS network and computes both optimisers' losses, as taming's
``VQLPIPSWithDiscriminator`` does.

LPIPS needs pretrained VGG16 + LPIPS-head weights; they are loaded only from a local path
(safetensors, or ``torch.load(weights_only=True)``), never downloaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .model import VQGANOutput
from .quantizer import all_reduce_sum_

# ----------------------------------------------------------------------------- discriminator


class PatchDiscriminator(nn.Module):
    """pix2pix / taming ``NLayerDiscriminator``: one real-vs-fake logit per overlapping patch.

    ``[B, C, H, W] -> [B, 1, H', W']``: ``n_layers`` stride-2 4x4 convs halve the side, two stride-1
    ones take 1 pixel each, so inputs need a side of at least ``3 * 2 ** n_layers`` (24 for the
    default 3 layers). Keys ``main.{i}.*`` as taming.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden layer keeps the resolution
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.n_layers, self.min_side = n_layers, 3 * 2**n_layers
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DCGAN init, as taming: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
        for m in self.main:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_side:
            raise ValueError(
                f"PatchDiscriminator with {self.n_layers} layers needs images of at least "
                f"{self.min_side}x{self.min_side}, got {tuple(x.shape[-2:])}; lower disc_layers"
            )
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``(relu(1 - D(x)) + relu(1 + D(G)))/2``, averaged over patches."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with real=1, fake=0: ``(softplus(-D(x)) + softplus(D(G)))/2``."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: ``-D(G)``."""
    return -logits_fake.mean()


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: ``softplus(-D(G)) = -log sigmoid(D(G))``."""
    return F.softplus(-logits_fake).mean()


def lecam_regularizer(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, ema_real: torch.Tensor, ema_fake: torch.Tensor
) -> torch.Tensor:
    """LeCAM (Tseng et al. 2021): pull real logits down to the EMA of fake ones and vice versa."""
    return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()


def adaptive_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """taming's balance of the GAN term: ``||dL_rec/dw|| / (||dL_gan/dw|| + 1e-4)`` at the
    decoder's last layer ``w``, clamped to ``[0, max_weight]`` and detached."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# ----------------------------------------------------------------------------- LPIPS

# torchvision vgg16().features[:30]: 13 convs (channels, "M" = max-pool), each followed by a ReLU.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_TAP_CHANNELS = (64, 128, 256, 512, 512)


class VGG16Features(nn.Module):
    """The VGG16 conv trunk with torchvision's layer indices (keys ``features.{i}.*``)."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[B, 3, H, W]`` -> the five tapped feature maps."""
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x)
        return out


class _NetLin(nn.Module):
    """LPIPS head: a 1x1 conv to one channel (``model.1.weight``, as the lpips package names it)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018), VGG16 variant; always frozen, eval mode.

    ``forward(x, y)`` with images ``[B, 3, H, W]`` in [-1, 1] returns ``[B]`` distances: unit-normalised
    features at five depths, squared differences weighted per channel by the heads ``lin0..lin4``,
    averaged over space, summed over depths. Build with random weights (tests) or load with
    `LPIPS.from_pretrained`.
    """

    shift: torch.Tensor  # buffers, see __init__
    scale: torch.Tensor

    def __init__(self):
        super().__init__()
        self.net = VGG16Features()
        for k, c in enumerate(_TAP_CHANNELS):
            self.add_module(f"lin{k}", _NetLin(c))
        # ImageNet statistics mapped to [-1, 1] inputs (lpips' ScalingLayer)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        # Frozen metric: the heads' dropout must never switch on with the surrounding model.
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        dist: torch.Tensor | int = 0
        for k, (a, b) in enumerate(zip(fx, fy)):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # [B, C_k, H_k, W_k], unit length per pixel
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            dist = dist + getattr(self, f"lin{k}")((a - b).pow(2)).mean(dim=(1, 2, 3))  # [B]
        assert isinstance(dist, torch.Tensor)  # five taps, never empty
        return dist

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> LPIPS:
        """Load weights from ``path``: one ``.safetensors``/``.pth``/``.pt``/``.bin`` file or a folder.

        Accepted keys: the VGG16 trunk as torchvision saves it (``features.{i}.*``, e.g. the file
        ``vgg16-397923af.pth``; ``classifier.*`` is ignored) and the heads as the lpips package
        saves them (``lin{k}.model.1.weight``, its ``weights/v0.1/vgg.pth``), or a full `LPIPS`
        state dict. Raises ``FileNotFoundError`` naming ``path`` when it does not exist.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"LPIPS weights not found at {str(path)!r}; put the VGG16 trunk (torchvision "
                f"vgg16-397923af.pth) and the LPIPS heads (lpips vgg.pth) there, or set "
                f"perceptual_weight=0 to train without the perceptual loss"
            )
        files = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES) if path.is_dir() else [path]
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(_load_weights(f))
        model = cls()
        state = {_lpips_key(k): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if k in model.state_dict()}
        missing = sorted(set(model.state_dict()) - set(state))
        if missing:
            raise ValueError(f"LPIPS weights at {str(path)!r} lack {len(missing)} tensors, e.g. {missing[:4]}")
        model.load_state_dict(state)
        return model


_WEIGHT_SUFFIXES = {".safetensors", ".pth", ".pt", ".bin"}


def _load_weights(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True)


def _lpips_key(key: str) -> str:
    """Map torchvision (``features.4.weight``) and lpips (``net.slice2.5.weight``) names to ours."""
    key = re.sub(r"^net\.slice\d+\.", "net.features.", key)
    return "net." + key if key.startswith("features.") else key


# ----------------------------------------------------------------------------- the loss


@dataclass
class VQGANLossConfig:
    """Training knobs of the VQ-GAN objective (defaults follow taming / LlamaGen).

    Args:
        reconstruction_loss: "l1" or "l2" pixel loss.
        reconstruction_weight: weight of the pixel loss.
        quant_weight: weight of the quantizer loss (codebook + beta * commitment).
        perceptual_weight: weight of LPIPS; > 0 needs ``lpips_path``.
        lpips_path: local file or folder with the VGG16 + LPIPS weights (see `LPIPS.from_pretrained`).
        disc_weight: weight of the adversarial generator term (times the adaptive weight).
        disc_start: global step from which the discriminator trains and the GAN term is on.
        disc_loss: "hinge" or "non_saturating".
        adaptive_weight: scale the GAN term by the gradient-norm ratio at the decoder's last layer.
        adaptive_weight_max: clamp for that ratio.
        lecam_weight: weight of the LeCAM regulariser on the discriminator; 0 disables it.
        lecam_decay: EMA decay of the mean real/fake logits LeCAM anchors to.
        disc_channels: width of the first discriminator layer.
        disc_layers: stride-2 layers of the discriminator (3 for 256px; fewer for tiny images).
    """

    reconstruction_loss: Literal["l1", "l2"] = "l1"
    reconstruction_weight: float = 1.0
    quant_weight: float = 1.0
    perceptual_weight: float = 0.0
    lpips_path: str | None = None
    disc_weight: float = 0.5
    disc_start: int = 0
    disc_loss: Literal["hinge", "non_saturating"] = "hinge"
    adaptive_weight: bool = True
    adaptive_weight_max: float = 1e4
    lecam_weight: float = 0.0
    lecam_decay: float = 0.99
    disc_channels: int = 64
    disc_layers: int = 3


class VQGANLoss(nn.Module):
    """Generator and discriminator objectives of a VQ-GAN; holds the discriminator and LPIPS.

    One training step: ``g = loss.generator_loss(x, out, step, vq.last_layer)`` -> backward
    ``g["loss"]`` and step the VQ-GAN optimiser; then, while ``loss.disc_active(step)``,
    ``d = loss.discriminator_loss(x, out.reconstruction, step)`` -> backward ``d["loss"]`` and step
    the discriminator's optimiser (zero its grads first: the generator step reaches it too).
    Dict values other than ``"loss"`` are detached, for logging.
    """

    lecam_ema_real: torch.Tensor  # buffers, see __init__
    lecam_ema_fake: torch.Tensor

    def __init__(self, config: VQGANLossConfig | None = None, image_channels: int = 3):
        super().__init__()
        self.config = config = config or VQGANLossConfig()
        if config.reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"reconstruction_loss must be 'l1' or 'l2', got {config.reconstruction_loss!r}")
        if config.disc_loss not in ("hinge", "non_saturating"):
            raise ValueError(f"disc_loss must be 'hinge' or 'non_saturating', got {config.disc_loss!r}")
        self.discriminator = PatchDiscriminator(image_channels, config.disc_channels, config.disc_layers)
        self.lpips: LPIPS | None = None
        if config.perceptual_weight > 0:
            if config.lpips_path is None:
                raise ValueError(
                    f"perceptual_weight={config.perceptual_weight} needs lpips_path= (a local folder with "
                    f"VGG16 + LPIPS weights); set perceptual_weight=0 to train without it"
                )
            self.lpips = LPIPS.from_pretrained(config.lpips_path)
        # EMAs of the mean real / fake logits for LeCAM
        self.register_buffer("lecam_ema_real", torch.zeros(()))
        self.register_buffer("lecam_ema_fake", torch.zeros(()))

    def disc_active(self, global_step: int) -> bool:
        """Whether the GAN terms are on at ``global_step``."""
        return global_step >= self.config.disc_start

    def generator_loss(
        self, inputs: torch.Tensor, output: VQGANOutput, global_step: int, last_layer: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Loss of the VQ-GAN (encoder, quantizer, decoder) for one batch.

        Args:
            inputs: the real images ``[B, 3, H, W]`` in [-1, 1].
            output: the `VQGANOutput` of ``vqgan(inputs)``.
            global_step: optimiser step, for ``disc_start``.
            last_layer: ``vqgan.last_layer``; needed when ``adaptive_weight`` and the GAN term is on.
        """
        cfg = self.config
        rec, quant_loss = output.reconstruction, output.quant_loss
        if rec is None or quant_loss is None:
            raise ValueError("output must be a VQGAN forward output with reconstruction and quant_loss")
        rec_loss = (inputs - rec).abs().mean() if cfg.reconstruction_loss == "l1" else F.mse_loss(rec, inputs)
        nll = cfg.reconstruction_weight * rec_loss
        p_loss = torch.zeros((), device=rec.device)
        if self.lpips is not None:
            p_loss = self.lpips(inputs.contiguous(), rec.contiguous()).mean()
            nll = nll + cfg.perceptual_weight * p_loss
        g_loss = torch.zeros((), device=rec.device)
        d_weight = torch.zeros((), device=rec.device)
        if self.disc_active(global_step):
            logits_fake = self.discriminator(rec.contiguous())
            g_loss = hinge_g_loss(logits_fake) if cfg.disc_loss == "hinge" else non_saturating_g_loss(logits_fake)
            d_weight = torch.ones((), device=rec.device)
            if cfg.adaptive_weight and torch.is_grad_enabled():  # not in validation: no graph there
                if last_layer is None:
                    raise ValueError("adaptive_weight needs last_layer=vqgan.last_layer (or set adaptive_weight=False)")
                d_weight = adaptive_weight(nll, g_loss, last_layer, cfg.adaptive_weight_max)
            d_weight = d_weight * cfg.disc_weight
        loss = nll + d_weight * g_loss + cfg.quant_weight * quant_loss
        logs = {
            "reconstruction_loss": rec_loss,
            "perceptual_loss": p_loss,
            "quant_loss": quant_loss,
            "generator_loss": g_loss,
            "adaptive_weight": d_weight,
        }
        return {"loss": loss, **{k: v.detach() for k, v in logs.items()}}

    def discriminator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int
    ) -> dict[str, torch.Tensor]:
        """Loss of the discriminator for one batch (real ``inputs``, fake ``reconstructions``).

        Call only while `disc_active`; before ``disc_start`` there is nothing to train.
        """
        if not self.disc_active(global_step):
            raise ValueError(
                f"the discriminator starts at step {self.config.disc_start}; check disc_active(step) first"
            )
        cfg = self.config
        logits_real = self.discriminator(inputs.contiguous().detach())
        logits_fake = self.discriminator(reconstructions.contiguous().detach())
        d_fn = hinge_d_loss if cfg.disc_loss == "hinge" else non_saturating_d_loss
        d_loss = d_fn(logits_real, logits_fake)
        lecam = torch.zeros((), device=inputs.device)
        if cfg.lecam_weight > 0:
            self._update_lecam_emas(logits_real.detach(), logits_fake.detach())
            lecam = lecam_regularizer(logits_real, logits_fake, self.lecam_ema_real, self.lecam_ema_fake)
        logs = {
            "disc_loss": d_loss,
            "lecam_loss": lecam,
            "logits_real": logits_real.mean(),
            "logits_fake": logits_fake.mean(),
        }
        return {"loss": d_loss + cfg.lecam_weight * lecam, **{k: v.detach() for k, v in logs.items()}}

    @torch.no_grad()
    def _update_lecam_emas(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        # Means over all ranks' logits, so every rank's EMAs (and discriminator losses) agree.
        sums = torch.stack([logits_real.float().sum(), logits_fake.float().sum()])
        counts = torch.tensor([logits_real.numel(), logits_fake.numel()], dtype=torch.float32, device=sums.device)
        stats = all_reduce_sum_(torch.cat([sums, counts]))  # [sum_real, sum_fake, n_real, n_fake]
        self.lecam_ema_real.lerp_(stats[0] / stats[2], 1 - self.config.lecam_decay)
        self.lecam_ema_fake.lerp_(stats[1] / stats[3], 1 - self.config.lecam_decay)
