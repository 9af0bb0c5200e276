"""Image tokenizer quantizers, side by side: our `VectorQuantizer` against the reference
``vector_quantize_pytorch.VectorQuantize``, and plain codes against l2-normalised low-dim codes.

Every variant trains the same VQ-GAN encoder/decoder (~2.9M params, f4: 8x8 = 64 tokens per 32 px
crop, K = 1024 codes) for the same steps on the same batches of crops of the photos that ship with
scikit-learn / scikit-image, with the shared `VQGANTrainer` step (reconstruction + quantizer loss;
the discriminator stays off: this compares quantizers). Reported on held-out crops: PSNR, SSIM,
codebook usage, perplexity, training steps/s and encode images/s, with ratios to the reference.
Variants train in parallel processes (one thread each); speed is then timed in one process.

    python benchmarks/tokenizer.py                     # 5 variants x 500 steps, ~12 min on 2 CPU cores
    python benchmarks/tokenizer.py --variants ours vqp no-quantizer ours-window100   # others
    python benchmarks/tokenizer.py --steps 20 --variants ours vqp   # a smoke run

Targets (docs/benchmarks.md): our default reaches >= 95% usage at K = 1024 and at least the
reference's PSNR.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace

import torch
import yaml
from torch import nn

from unimodal.evaluation.metrics import codebook_perplexity, codebook_usage, psnr, ssim
from unimodal.image_data import CropPolicy, ShippedCrops
from unimodal.training import make_accelerator, resolve_config
from unimodal.vq.losses import VQGANLoss, VQGANLossConfig
from unimodal.vq.quantizer import QuantizerOutput, code_perplexity
from unimodal.vq.train import VQGANModelArguments, VQGANTrainConfig, VQGANTrainer


class ReferenceQuantizer(nn.Module):
    """``vector_quantize_pytorch.VectorQuantize`` behind our quantizer's interface, so it drops into
    `VQGAN` (``forward`` -> `QuantizerOutput`, ``lookup``, ``embed``) with nothing else changed."""

    def __init__(self, codebook_size: int, dim: int, **options):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        self.codebook_size = codebook_size
        self.vq = VectorQuantize(dim=dim, codebook_size=codebook_size, accept_image_fmap=True, **options)

    @property
    def embedding(self) -> SimpleNamespace:  # VQGAN.decode reads quantize.embedding.weight.device
        return SimpleNamespace(weight=self.vq.codebook)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:  # z [B, D, h, w]
        with torch.autocast(z.device.type, enabled=False):
            quantized, codes, loss, parts = self.vq(z.float(), return_loss_breakdown=True)
        counts = torch.bincount(codes.flatten(), minlength=self.codebook_size).float()
        zero = loss.new_zeros(())
        return QuantizerOutput(quantized=quantized.to(z.dtype), codes=codes, loss=loss, codebook_loss=zero,
                               commitment_loss=parts.commitment, perplexity=code_perplexity(counts),
                               usage=(counts > 0).float().mean())

    @torch.no_grad()
    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        return self.vq(z.float())[1]

    def embed(self, codes: torch.Tensor) -> torch.Tensor:  # [B, h, w] -> [B, D, h, w]
        return self.vq.get_output_from_indices(codes)


class NoQuantizer(nn.Module):
    """The continuous autoencoder: the ceiling any quantizer's reconstruction is measured against."""

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        zero = z.new_zeros((), dtype=torch.float32)
        return QuantizerOutput(quantized=z, codes=None, loss=zero, codebook_loss=zero, commitment_loss=zero,
                               perplexity=zero, usage=zero)


K = 1024
# The encoder/decoder every variant trains: the `model:` section of the shipped train_tokenizer.yaml
# (the setting this benchmark tunes), at K codes.
BASE_MODEL = {**yaml.safe_load(resolve_config("train_tokenizer").read_text())["model"], "codebook_size": K}
# name -> (overrides of BASE_MODEL, replacement quantizer factory or None)
PLAIN = dict(embed_dim=64, use_l2_norm=False, dead_code_threshold=0)
VARIANTS = {
    "ours": ({}, None),  # the recipe default: l2-normalised 8-d codes + dead-code restart
    "ours-window100": ({"usage_window": 100}, None),  # VQGANConfig's default restart window
    "ours-plain": (PLAIN, None),
    "ours-plain-restart": ({**PLAIN, "dead_code_threshold": 1}, None),
    "ours-ema-kmeans": ({**PLAIN, "ema_decay": 0.99, "kmeans_init": True, "dead_code_threshold": 1}, None),
    "vqp": ({"embed_dim": 64}, lambda: ReferenceQuantizer(
        K, 64, decay=0.99, kmeans_init=True, threshold_ema_dead_code=2, commitment_weight=0.25)),
    "vqp-cosine": ({"embed_dim": 8}, lambda: ReferenceQuantizer(
        K, 8, decay=0.99, kmeans_init=True, threshold_ema_dead_code=2, commitment_weight=0.25, use_cosine_sim=True)),
    "no-quantizer": ({"embed_dim": 64}, NoQuantizer),
}
DESCRIPTIONS = {
    "ours": "ours: l2-norm 8-d codes + dead-code restart (default)",
    "ours-window100": "ours: l2-norm 8-d codes + restart over 100 batches",
    "ours-plain": "ours: plain 64-d codes",
    "ours-plain-restart": "ours: plain 64-d codes + dead-code restart",
    "ours-ema-kmeans": "ours: plain 64-d, EMA + k-means + restart",
    "vqp": "vector_quantize_pytorch: EMA + k-means + dead-code 2",
    "vqp-cosine": "vector_quantize_pytorch: cosine 8-d, EMA + k-means + dead-code 2",
    "no-quantizer": "no quantizer (continuous autoencoder)",
}
DEFAULT = ["ours", "ours-plain", "ours-plain-restart", "vqp", "vqp-cosine"]
NEVER = 10**9  # disc_start: the discriminator never trains here


def shared_pixels(args) -> tuple[torch.Tensor, torch.Tensor]:
    """Training crops (random scale / position / flip), ``[steps * B, 3, 32, 32]``, and held-out crops
    from the part of each photo no training crop touches; identical in every process."""
    crops = CropPolicy(32, True, 0.1, 0.4, flip=True)
    train = ShippedCrops(crops, "train", args.steps * args.batch_size, seed=args.seed)
    held = ShippedCrops(CropPolicy(32, True, 0.1, 0.4), "eval", args.eval_samples, seed=args.seed)
    return torch.stack([train[i] for i in range(len(train))]), torch.stack([held[i] for i in range(len(held))])


def build_trainer(name: str, args) -> VQGANTrainer:
    """The shared encoder/decoder with this variant's quantizer, and the shared train step."""
    overrides, factory = VARIANTS[name]
    torch.manual_seed(args.seed)
    vq = VQGANModelArguments(model={**BASE_MODEL, **overrides}).build(image_size=32)
    if factory is not None:
        vq.quantize = factory()
    loss = VQGANLoss(VQGANLossConfig(disc_start=NEVER, disc_layers=2, disc_channels=8))
    config = VQGANTrainConfig(learning_rate=args.lr, adam_beta1=0.9, adam_beta2=0.99, warmup_steps=args.steps // 20,
                              max_steps=args.steps, min_lr_ratio=0.1, max_grad_norm=1.0)
    return VQGANTrainer(make_accelerator(log_with=None, seed=args.seed), vq, loss, config)


def quality(name: str, args) -> dict:
    """Train one variant for ``--steps`` on the shared batches; its held-out reconstruction quality.

    Runs in a worker process with ``--threads`` threads, so variants train side by side.
    """
    torch.set_num_threads(args.threads)
    train_pixels, eval_pixels = shared_pixels(args)
    trainer = build_trainer(name, args)
    for step, batch in enumerate(train_pixels.split(args.batch_size)):  # the same batches for every variant
        logs = trainer.step(batch, step)
    vq = trainer.vqgan.eval()
    with torch.no_grad():
        out = [vq(b) for b in eval_pixels.split(256)]
    recon = torch.cat([o.reconstruction for o in out]).float()
    row = {"name": name, "psnr": psnr(recon, eval_pixels).item(), "ssim": ssim(recon, eval_pixels).item(),
           "final_rec_loss": logs["reconstruction_loss"]}
    if out[0].codes is not None:
        codes = torch.cat([o.codes for o in out])
        row.update(usage=codebook_usage(codes, K), perplexity=codebook_perplexity(codes, K))
    print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return row


def measure_speed(rows: list[dict], args) -> None:
    """Training steps/s and encode images/s of every variant, in this one process, round robin and
    best of ``--speed_rounds``: on a shared machine each variant then sees the same load (the
    parallel quality runs cannot be timed fairly). Speed does not depend on the trained weights."""
    train_pixels, eval_pixels = shared_pixels(args)
    batches = train_pixels[: args.batch_size * args.speed_steps].split(args.batch_size)
    trainers = {row["name"]: build_trainer(row["name"], args) for row in rows}
    for trainer in trainers.values():
        trainer.step(batches[0], 0)  # untimed warm-up: k-means init, allocator, oneDNN kernels
    best = {name: [float("inf"), float("inf")] for name in trainers}
    for _ in range(args.speed_rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for i, batch in enumerate(batches):
                trainer.step(batch, 1 + i)
            best[name][0] = min(best[name][0], (time.perf_counter() - start) / len(batches))
            if not isinstance(trainer.vqgan.quantize, NoQuantizer):
                trainer.vqgan.eval()
                start = time.perf_counter()
                trainer.vqgan.encode(eval_pixels)
                best[name][1] = min(best[name][1], (time.perf_counter() - start) / len(eval_pixels))
    for row in rows:
        step_s, encode_s = best[row["name"]]
        row["steps_s"] = 1 / step_s
        if encode_s < float("inf"):
            row["encode_img_s"] = 1 / encode_s


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(rows: list[dict], reference: str) -> str:
    ref = next((r for r in rows if r["name"] == reference), None)

    def ratio(r, key):
        if ref is None or r.get(key) is None or not ref.get(key):
            return None
        return r[key] / ref[key]

    lines = ["| variant | PSNR dB (Δ ref) | SSIM | usage | perplexity | train steps/s (× ref) | encode img/s (× ref) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        d_psnr = None if ref is None else r["psnr"] - ref["psnr"]
        lines.append(
            f"| {DESCRIPTIONS[r['name']]} | {r['psnr']:.2f} ({fmt(d_psnr, '+.2f')}) | {r['ssim']:.3f} | "
            f"{fmt(r.get('usage'), '.1%')} | {fmt(r.get('perplexity'), '.0f')} | "
            f"{r['steps_s']:.2f} ({fmt(ratio(r, 'steps_s'), '.2f')}) | "
            f"{fmt(r.get('encode_img_s'), '.0f')} ({fmt(ratio(r, 'encode_img_s'), '.2f')}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval_samples", type=int, default=512)
    parser.add_argument("--variants", nargs="+", default=DEFAULT, choices=sorted(VARIANTS))
    parser.add_argument("--reference", default="vqp", choices=sorted(VARIANTS))
    parser.add_argument("--speed_steps", type=int, default=10, help="timed training steps per variant and round")
    parser.add_argument("--speed_rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="variants trained in parallel")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()

    jobs = max(1, min(args.jobs, len(args.variants)))
    if jobs == 1:
        rows = [quality(name, args) for name in args.variants]
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(quality, args.variants, [args] * len(args.variants)))
    measure_speed(rows, args)

    print(f"\n{args.steps} steps x batch {args.batch_size}, K={K}, {args.eval_samples} held-out 32 px crops; "
          f"{datetime.date.today()}, {platform.machine()} x {os.cpu_count()} cores, {jobs} variants at a time "
          f"x {args.threads} thread(s), torch {torch.__version__}; {time.perf_counter() - wall:.0f} s wall\n")
    print(table(rows, args.reference))
    ours = next((r for r in rows if r["name"] == "ours"), None)
    ref = next((r for r in rows if r["name"] == args.reference), None)
    if ours is not None and ref is not None:
        print(f"\ntargets: usage {ours['usage']:.1%} (>= 95%: {'met' if ours['usage'] >= 0.95 else 'MISSED'}); "
              f"PSNR {ours['psnr'] - ref['psnr']:+.2f} dB vs reference "
              f"({'met' if ours['psnr'] >= ref['psnr'] else 'MISSED'})")
    return rows


if __name__ == "__main__":
    main()
