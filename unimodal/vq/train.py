"""One VQ-GAN optimisation step, shared by the `unimodal train-tokenizer` recipe and the tokenizer benchmark.

A step is two updates with two optimisers, as in taming-transformers:

1. generator: ``vqgan(pixels)`` -> `VQGANLoss.generator_loss` (pixels, LPIPS, quantizer, and the
   adaptive-weighted GAN term once the discriminator is on) -> the VQ-GAN's optimiser;
2. discriminator (from ``disc_start``): `VQGANLoss.discriminator_loss` on real pixels and the
   detached reconstruction -> the discriminator's optimiser.

Multi-process: the VQ-GAN and the discriminator are each prepared by accelerate (DDP), so their
gradients are averaged across ranks; the quantizer all-reduces its own codebook statistics.
`VQGANTrainer` also keeps an optional EMA of the VQ-GAN's weights. A checkpoint holds what a
resumed run needs: both networks and both optimisers through accelerate's ``save_state``, and
the EMA copy and the buffers ``state_dict`` leaves out through `VQGANTrainer.state_tensors`
(safetensors: nothing is unpickled on resume).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ..errors import UserError, bad_input
from ..training import CheckpointManager, check_finite, cosine_with_warmup
from .config import VQGANConfig
from .losses import VQGANLoss
from .model import VQGAN


@dataclass
class VQGANModelArguments:
    """The VQ-GAN to train: a saved one (``model_name_or_path``, folder or Hub repo) or a new one
    built from ``model``, the keyword arguments of `VQGANConfig` (its defaults and checks are the
    only ones; the shipped recipe configs set a ~2.9M-parameter f4 model for 32 px crops, the
    setting the tokenizer benchmark tunes). ``image_size`` is not a key of ``model``: it is the
    data's resolution, given to `build`. With ``model_name_or_path``, ``model`` is ignored."""

    model_name_or_path: str | None = None
    model: dict[str, Any] = field(default_factory=dict)

    def build(self, image_size: int) -> VQGAN:
        """Load ``model_name_or_path`` or build a fresh VQ-GAN for ``image_size`` px images.

        A loaded model trained at another resolution keeps its weights; its ``config.image_size``
        becomes ``image_size`` (the resolution it is now trained at and generates). Raises
        `UserError` for a key `VQGANConfig` does not have or a value its checks refuse.
        """
        if self.model_name_or_path:
            model = VQGAN.from_pretrained(self.model_name_or_path)
            model.config.image_size = image_size
            return model
        if "image_size" in self.model:
            raise UserError("model.image_size: set image_size (the data's resolution) instead")
        known = set(inspect.signature(VQGANConfig.__init__).parameters) - {"self", "kwargs", "image_size"}
        unknown = sorted(set(self.model) - known)
        if unknown:
            raise UserError(f"model: VQGANConfig has no {unknown}; its keys are {sorted(known)}")
        with bad_input("model"):
            return VQGAN(VQGANConfig(image_size=image_size, **self.model))


@dataclass
class VQGANTrainConfig:
    """Optimisation knobs of a VQ-GAN run (the architecture is in `VQGANConfig`, the objective
    in `VQGANLossConfig`).

    Args:
        learning_rate: peak Adam learning rate of the VQ-GAN.
        disc_learning_rate: peak learning rate of the discriminator.
        adam_beta1: Adam beta1 (taming and LlamaGen use 0.5 for GAN stability).
        adam_beta2: Adam beta2.
        weight_decay: AdamW weight decay (both optimisers).
        warmup_steps: linear warm-up steps, then cosine decay to ``min_lr_ratio`` at ``max_steps``.
        max_steps: length of the schedule (the recipe stops there).
        min_lr_ratio: final learning rate as a fraction of the peak.
        max_grad_norm: clip each network's gradient norm to this; 0 disables clipping.
        weight_ema_decay: keep an exponential moving average of the VQ-GAN's weights with this
            decay (e.g. 0.999) for evaluation and the saved model; None disables it.
    """

    learning_rate: float = 1e-4
    disc_learning_rate: float = 1e-4
    adam_beta1: float = 0.5
    adam_beta2: float = 0.9
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_steps: int = 1000
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    weight_ema_decay: float | None = None


class WeightEMA(nn.Module):
    """An exponential moving average copy of a model (trainable weights averaged; frozen
    parameters such as an EMA codebook, and all buffers, copied as they are)."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"weight_ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema = decay * ema + (1 - decay) * weights`` for every trainable parameter of ``model``."""
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            if p.requires_grad:
                ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - self.decay)
            else:
                ema_p.copy_(p)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)


def codebook_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the quantizer's parameters and buffers (codebook, EMA sums, usage statistics):
    equal on every rank of a correctly synchronised run."""
    h = hashlib.sha256()
    quantize = cast(nn.Module, model.quantize)  # a VectorQuantizer
    for name, t in [*quantize.named_parameters(), *quantize.named_buffers()]:
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class VQGANTrainer:
    """Owns the two optimisers and runs `step`; see the module docstring.

    Build it before loading a checkpoint: it prepares the model, the discriminator and both
    optimisers with ``accelerator``; save ``state_tensors()`` with each checkpoint.

    Args:
        accelerator: from `unimodal.training.make_accelerator`.
        model: the (unprepared) `VQGAN`, or any module with its ``forward``/``last_layer``/``quantize``.
        loss: the `VQGANLoss`; its discriminator is replaced by the prepared (DDP) one.
        config: optimisation settings.
        checkpoints: named in the error raised on a non-finite loss.
    """

    def __init__(self, accelerator, model: nn.Module, loss: VQGANLoss, config: VQGANTrainConfig,
                 checkpoints: CheckpointManager | None = None):
        self.accelerator, self.config, self.checkpoints = accelerator, config, checkpoints
        self.ema = WeightEMA(model, config.weight_ema_decay) if config.weight_ema_decay else None
        betas = (config.adam_beta1, config.adam_beta2)
        opt_g = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  betas=betas, weight_decay=config.weight_decay)
        opt_d = torch.optim.AdamW(loss.discriminator.parameters(), lr=config.disc_learning_rate, betas=betas,
                                  weight_decay=config.weight_decay)
        # VQGANLoss calls its discriminator directly; swapping in the prepared module is what makes
        # those calls go through DDP, so discriminator gradients are averaged across ranks too.
        self.model, loss.discriminator, self.opt_g, self.opt_d = accelerator.prepare(
            model, loss.discriminator, opt_g, opt_d)
        self.loss = loss.to(accelerator.device)
        self.vqgan = accelerator.unwrap_model(self.model)
        if self.ema is not None:
            self.ema.to(accelerator.device)

    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        # What accelerate's save_state leaves out: the VQ-GAN's buffers (state_dict skips the
        # quantizer's rolling usage window and restart history, which an exact resume needs), the
        # loss's own buffers (LeCAM's EMAs; the discriminator is saved by accelerate) and the EMA
        # copy. Names never contain DDP's "module.", so any process count can resume.
        tensors = {f"vqgan.{n}": b for n, b in self.vqgan.named_buffers()}
        tensors.update({f"loss.{n}": b for n, b in self.loss.named_buffers(recurse=False)})
        if self.ema is not None:
            ema = self.ema.model
            tensors.update({f"ema.{n}": t for n, t in [*ema.named_parameters(), *ema.named_buffers()]})
        return tensors

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint needs besides accelerate's state: pass to
        ``CheckpointManager.save(..., tensors=)`` and back through `load_state_tensors`."""
        return {k: v.detach().clone() for k, v in self._extra_tensors().items()}

    @torch.no_grad()
    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_tensors` returned (after ``CheckpointManager.load``)."""
        targets = self._extra_tensors()
        missing = sorted(set(targets) - set(state))
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}; was it written "
                             "with another model config or weight_ema_decay, or by a unimodal older than the "
                             "quantizer's recent_picks usage record (then start from its saved VQ-GAN with "
                             "model_name_or_path)?")
        for name, target in targets.items():
            target.copy_(state[name])

    @property
    def eval_model(self) -> nn.Module:
        """The weights to evaluate and save: the EMA copy when enabled, else the trained model."""
        return self.ema.model if self.ema is not None else self.vqgan

    def _set_learning_rates(self, step: int) -> None:
        # Set by hand from the step count rather than by a prepared scheduler, which would step
        # once per process and shorten the warm-up; a resumed run continues the schedule exactly.
        c = self.config
        scale = cosine_with_warmup(step, c.warmup_steps, c.max_steps, c.min_lr_ratio)
        for opt, lr in ((self.opt_g, c.learning_rate), (self.opt_d, c.disc_learning_rate)):
            for group in opt.param_groups:
                group["lr"] = lr * scale

    def _check_finite(self, loss: torch.Tensor, step: int) -> None:
        # Averaged over ranks: a NaN on one rank stops every rank (none is left waiting in a collective).
        check_finite(self.accelerator.reduce(loss.detach(), reduction="mean"), step, self.checkpoints)

    def _clip(self, module: nn.Module) -> torch.Tensor | None:
        if self.config.max_grad_norm > 0:
            return self.accelerator.clip_grad_norm_(module.parameters(), self.config.max_grad_norm)
        return None

    def step(self, pixels: torch.Tensor, step: int) -> dict[str, float]:
        """One generator update, then one discriminator update once ``disc_start`` is reached.

        ``pixels [B, 3, H, W]`` in [-1, 1]; ``step`` is the 0-based optimiser step. Returns the
        logged scalars (losses, perplexity, rolling codebook usage, gradient norms, learning rate).
        """
        self.model.train()
        self._set_learning_rates(step)
        out = self.model(pixels)  # VQGANOutput: reconstruction [B, 3, H, W], codes [B, h, w], losses
        g = self.loss.generator_loss(pixels, out, step, self.vqgan.last_layer)
        self._check_finite(g["loss"], step)
        self.opt_g.zero_grad(set_to_none=True)
        self.accelerator.backward(g["loss"])
        grad_norm = self._clip(self.model)
        self.opt_g.step()
        logs = {k: float(v.detach()) for k, v in g.items()}
        logs.update(perplexity=float(out.perplexity), usage=float(out.usage), lr=self.opt_g.param_groups[0]["lr"])
        if grad_norm is not None:
            logs["grad_norm"] = float(grad_norm)
        if self.loss.disc_active(step):
            # The generator's backward also reached the discriminator: start from zero.
            self.opt_d.zero_grad(set_to_none=True)
            d = self.loss.discriminator_loss(pixels, out.reconstruction, step)
            self._check_finite(d["loss"], step)
            self.accelerator.backward(d["loss"])
            disc_norm = self._clip(self.loss.discriminator)
            self.opt_d.step()
            logs.update({("disc_total_loss" if k == "loss" else k): float(v.detach()) for k, v in d.items()})
            if disc_norm is not None:
                logs["disc_grad_norm"] = float(disc_norm)
        if self.ema is not None:
            self.ema.update(self.vqgan)
        return logs
