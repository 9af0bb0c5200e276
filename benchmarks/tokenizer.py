"""Image tokenizer quantizers, side by side at several codebook sizes: our VQ (`VectorQuantizer`),
FSQ, LFQ and SimVQ (`VQGANConfig.quantizer`), and `vector_quantize_pytorch`'s VectorQuantize,
FSQ, LFQ and SimVQ as references.

Every variant trains the same VQ-GAN encoder/decoder (~2.9M params, f4: 8x8 = 64 tokens per 32 px
crop, 16x16 per 64 px crop) for the same steps on the same batches of crops of the photos that
ship with scikit-learn / scikit-image, with the shared `VQGANTrainer` step (reconstruction +
quantizer loss; the discriminator stays off: this compares quantizers). A variant is
``family@K``: FSQ takes the paper's levels nearest to K (1000, 15,360, 64,000 codes), LFQ
``2 ** round(log2 K)``. Reported on held-out crops: PSNR, SSIM, codebook usage, perplexity,
training steps/s and encode images/s, with ratios to the reference at the same K (``vqp@K``).
Variants train in parallel processes (one thread each); speed is then timed in one process.

    python benchmarks/tokenizer.py                       # 5 families x K 1024/16384/65536, 500 steps
    python benchmarks/tokenizer.py --crop 64             # 64 px crops (16x16 tokens)
    python benchmarks/tokenizer.py --long_steps 3000     # then the best two again for 3000 steps
    python benchmarks/tokenizer.py --variants ours@1024 vqp-fsq@1024 no-quantizer@1024   # others
    python benchmarks/tokenizer.py --steps 20 --sizes 1024 --variants ours fsq   # a smoke run

The LM side of a large codebook (fine-tuning tokens/s and memory at 16k vs 64k image codes):
benchmarks/tokenizer_lm.py.

Targets (docs/benchmarks.md): our VQ >= 99% usage at K = 16,384, FSQ / LFQ 100%; at equal steps
the best new quantizer's PSNR >= our VQ's at each K.
"""

from __future__ import annotations

import argparse
import datetime
import math
import multiprocessing
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch
import yaml
from torch import nn

from unimodal.evaluation.metrics import codebook_perplexity, codebook_usage, psnr, ssim
from unimodal.image_data import CropPolicy, ShippedCrops
from unimodal.training import make_accelerator, resolve_config
from unimodal.vq.config import FSQ_LEVELS
from unimodal.vq.losses import VQGANLoss, VQGANLossConfig
from unimodal.vq.quantizer import QuantizerOutput, code_perplexity
from unimodal.vq.train import VQGANModelArguments, VQGANTrainConfig, VQGANTrainer


class LibraryQuantizer(nn.Module):
    """A `vector_quantize_pytorch` quantizer behind our quantizer's interface, so it drops into
    `VQGAN` (``forward`` -> `QuantizerOutput`, ``lookup``, ``embed``) with nothing else changed.

    ``module(z)`` returns ``(quantized, codes[, loss])`` on channel-first ``z [B, D, h, w]``;
    ``embed`` maps codes ``[B, h, w]`` back to channel-first latents.
    """

    def __init__(self, module: nn.Module, codebook_size: int, embed: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.module, self.codebook_size, self._embed = module, codebook_size, embed

    def forward(self, z: torch.Tensor) -> QuantizerOutput:  # z [B, D, h, w]
        with torch.autocast(z.device.type, enabled=False):
            quantized, codes, *rest = self.module(z.float())
        codes = codes.long()
        counts = torch.bincount(codes.flatten(), minlength=self.codebook_size).float()
        loss = rest[0] if rest else quantized.new_zeros(())
        zero = quantized.new_zeros(())
        return QuantizerOutput(quantized=quantized.to(z.dtype), codes=codes, loss=loss, codebook_loss=zero,
                               commitment_loss=loss, perplexity=code_perplexity(counts),
                               usage=(counts > 0).float().mean())

    @torch.no_grad()
    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        return self.module(z.float())[1].long()

    def embed(self, codes: torch.Tensor) -> torch.Tensor:  # [B, h, w] -> [B, D, h, w]
        return self._embed(codes)


class NoQuantizer(nn.Module):
    """The continuous autoencoder: the ceiling any quantizer's reconstruction is measured against."""

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        zero = z.new_zeros((), dtype=torch.float32)
        return QuantizerOutput(quantized=z, codes=None, loss=zero, codebook_loss=zero, commitment_loss=zero,
                               perplexity=zero, usage=zero)


# The encoder/decoder every variant trains: the `model:` section of the shipped train_tokenizer.yaml
# (the setting this benchmark tunes).
BASE_MODEL = yaml.safe_load(resolve_config("train_tokenizer").read_text())["model"]
PLAIN = dict(embed_dim=64, use_l2_norm=False, dead_code_threshold=0)


@dataclass
class Variant:
    """One row: ``overrides`` of `BASE_MODEL` (codebook_size included) and an optional
    replacement quantizer ``factory`` (a reference implementation)."""

    name: str
    group: int  # the K asked for (FSQ's 1000 codes are compared at 1024)
    k: int  # the codes it has
    overrides: dict
    factory: Callable[[], nn.Module] | None
    description: str


def fsq_levels(k: int) -> list[int]:
    """The FSQ paper's levels whose code count is nearest to ``k`` (in log scale)."""
    return FSQ_LEVELS[min(FSQ_LEVELS, key=lambda n: abs(math.log(n / k)))]


def _vqp_vq(k: int, dim: int, **options) -> LibraryQuantizer:
    from vector_quantize_pytorch import VectorQuantize

    vq = VectorQuantize(dim=dim, codebook_size=k, accept_image_fmap=True, decay=0.99, kmeans_init=True,
                        threshold_ema_dead_code=2, commitment_weight=0.25, **options)
    return LibraryQuantizer(vq, k, vq.get_output_from_indices)


def _vqp_fsq(levels: list[int]) -> LibraryQuantizer:
    from vector_quantize_pytorch import FSQ

    fsq = FSQ(levels)
    return LibraryQuantizer(fsq, math.prod(levels), fsq.indices_to_codes)


def _vqp_lfq(k: int) -> LibraryQuantizer:
    from vector_quantize_pytorch import LFQ

    lfq = LFQ(codebook_size=k, dim=int(math.log2(k)), entropy_loss_weight=0.1, commitment_loss_weight=0.25)
    return LibraryQuantizer(lfq, k, lfq.indices_to_codes)


def _vqp_simvq(k: int, dim: int) -> LibraryQuantizer:
    from vector_quantize_pytorch import SimVQ

    simvq = SimVQ(dim=dim, codebook_size=k, channel_first=True)  # its defaults: rotation trick
    return LibraryQuantizer(simvq, k, simvq.indices_to_codes)


def variant(spec: str, k: int | None = None) -> Variant:
    """``family@K`` (or ``family`` with ``k``) -> its `Variant`; see `FAMILIES`."""
    family, _, size = spec.partition("@")
    k = int(size) if size else k
    if family not in FAMILIES or k is None:
        raise SystemExit(f"unknown variant {spec!r}: use family@K with a family of {sorted(FAMILIES)}")
    levels, bits = fsq_levels(k), round(math.log2(k))
    kk = {"fsq": math.prod(levels), "vqp-fsq": math.prod(levels), "lfq": 2 ** bits, "vqp-lfq": 2 ** bits}.get(family, k)
    specs: dict[str, tuple[dict, Callable[[], nn.Module] | None, str]] = {
        "ours": ({}, None, "ours: VQ, l2-norm 8-d codes + dead-code restart (default)"),
        "ours-batches100": ({"usage_window": 100}, None, "ours: VQ, l2-norm 8-d + restart over 100 batches"),
        **{window_family(n, t): ({"usage_tokens_per_code": n, "dead_code_threshold": t}, None,
                                 f"ours: VQ, l2-norm 8-d + restart if < {t} picks in {n} latents per code")
           for n, t in WINDOWS},
        "ours-plain": (PLAIN, None, "ours: VQ, plain 64-d codes"),
        "ours-plain-restart": ({**PLAIN, "dead_code_threshold": 1}, None, "ours: VQ, plain 64-d + dead-code restart"),
        "ours-ema-kmeans": ({**PLAIN, "ema_decay": 0.99, "kmeans_init": True, "dead_code_threshold": 1}, None,
                            "ours: VQ, plain 64-d, EMA + k-means + restart"),
        "fsq": ({"quantizer": "fsq", "fsq_levels": levels, "embed_dim": len(levels)}, None, f"ours: FSQ {levels}"),
        "lfq": ({"quantizer": "lfq", "embed_dim": bits}, None, f"ours: LFQ {bits} bits"),
        "simvq": ({"quantizer": "simvq"}, None, "ours: SimVQ 8-d"),
        "vqp": ({"embed_dim": 64}, lambda: _vqp_vq(kk, 64), "vector_quantize_pytorch: VQ, EMA + k-means + dead-code 2"),
        "vqp-cosine": ({}, lambda: _vqp_vq(kk, 8, use_cosine_sim=True),
                       "vector_quantize_pytorch: VQ cosine 8-d, EMA + k-means + dead-code 2"),
        "vqp-fsq": ({"embed_dim": len(levels)}, lambda: _vqp_fsq(levels), f"vector_quantize_pytorch: FSQ {levels}"),
        "vqp-lfq": ({"embed_dim": bits}, lambda: _vqp_lfq(kk), f"vector_quantize_pytorch: LFQ {bits} bits"),
        "vqp-simvq": ({}, lambda: _vqp_simvq(kk, 8), "vector_quantize_pytorch: SimVQ 8-d, rotation trick"),
        "no-quantizer": ({"embed_dim": 64}, NoQuantizer, "no quantizer (continuous autoencoder)"),
    }
    overrides, factory, description = specs[family]
    return Variant(f"{family}@{k}", k, kk, {**overrides, "codebook_size": kk}, factory, description)


# ours-window<n>[-threshold<t>]: usage_tokens_per_code n (and dead_code_threshold t) instead of the config's
WINDOWS = ((2, 1), (4, 1), (8, 1), (16, 1), (32, 1), (4, 2), (8, 2), (8, 3), (16, 4))


def window_family(n: int, t: int) -> str:
    return f"ours-window{n}" + (f"-threshold{t}" if t != 1 else "")


FAMILIES = ("ours", "ours-batches100", *(window_family(n, t) for n, t in WINDOWS), "ours-plain", "ours-plain-restart",
            "ours-ema-kmeans", "fsq", "lfq", "simvq", "vqp", "vqp-cosine", "vqp-fsq", "vqp-lfq", "vqp-simvq",
            "no-quantizer")
DEFAULT = ["ours", "fsq", "lfq", "simvq", "vqp"]
NEVER = 10**9  # disc_start: the discriminator never trains here


def tokens_per_crop(args) -> int:
    return (args.crop // 4) ** 2  # the f4 model


def eval_samples(args, k: int) -> int:
    """Held-out crops for a codebook of ``k`` codes: ``--eval_samples``, or at least 512 and enough
    for ``--tokens_per_code`` tokens per code (usage on fewer tokens than codes cannot reach 100%).
    Rows are compared within one K, so each K gets its own count (4096 crops for every K cost 2x
    the training time)."""
    if args.eval_samples:
        return args.eval_samples
    return max(512, math.ceil(args.tokens_per_code * k / tokens_per_crop(args)))


def usage_ceiling(k: int, tokens: int) -> float:
    """Usage a perfectly uniform code distribution reaches on ``tokens`` draws: ``1 - (1 - 1/k)^n``
    (98.2% at 4 tokens per code, 100.0% at 20): what a usage figure is read against."""
    return 1 - (1 - 1 / k) ** tokens


def train_batches(args, steps: int):
    """Batches ``[B, 3, crop, crop]`` of random training crops (scale / position / flip), built on
    the fly (3000 steps of 64 px crops would be 2.4 GB held in memory); identical in every process."""
    data = ShippedCrops(CropPolicy(args.crop, True, 0.1, 0.4, flip=True), "train", steps * args.batch_size,
                        seed=args.seed)
    for step in range(steps):
        yield torch.stack([data[i] for i in range(step * args.batch_size, (step + 1) * args.batch_size)])


def held_out(args, k: int) -> torch.Tensor:
    """Held-out crops from the part of each photo no training crop touches ``[N, 3, crop, crop]``."""
    data = ShippedCrops(CropPolicy(args.crop, True, 0.1, 0.4), "eval", eval_samples(args, k), seed=args.seed)
    return torch.stack([data[i] for i in range(len(data))])


def build_trainer(v: Variant, args, steps: int) -> VQGANTrainer:
    """The shared encoder/decoder with this variant's quantizer, and the shared train step.

    The rolling usage window (and with it our VQ's dead-code restart) is `VQGANConfig`'s
    ``usage_tokens_per_code`` latents per code, unless the variant sets it.
    """
    torch.manual_seed(args.seed)
    vq = VQGANModelArguments(model={**BASE_MODEL, **v.overrides}).build(image_size=args.crop)
    if v.factory is not None:
        vq.quantize = v.factory()
    loss = VQGANLoss(VQGANLossConfig(disc_start=NEVER, disc_layers=2, disc_channels=8))
    config = VQGANTrainConfig(learning_rate=args.lr, adam_beta1=0.9, adam_beta2=0.99, warmup_steps=steps // 20,
                              max_steps=steps, min_lr_ratio=0.1, max_grad_norm=1.0)
    return VQGANTrainer(make_accelerator(log_with=None, seed=args.seed), vq, loss, config)


def quality(spec: str, args, steps: int) -> dict:
    """Train one variant for ``steps`` on the shared batches; its held-out reconstruction quality.

    Runs in a worker process with ``--threads`` threads, so variants train side by side.
    """
    torch.set_num_threads(args.threads)
    v = variant(spec)
    trainer = build_trainer(v, args, steps)
    start = time.perf_counter()
    for step, batch in enumerate(train_batches(args, steps)):  # the same batches for every variant
        logs = trainer.step(batch, step)
    eval_pixels = held_out(args, v.k)
    vq = trainer.vqgan.eval()
    with torch.no_grad():
        out = [vq(b) for b in eval_pixels.split(256)]
    recon = torch.cat([o.reconstruction for o in out]).float()
    row = {"name": v.name, "group": v.group, "k": v.k, "description": v.description, "steps": steps,
           "psnr": psnr(recon, eval_pixels).item(), "ssim": ssim(recon, eval_pixels).item(),
           "final_rec_loss": logs["reconstruction_loss"], "train_usage": logs["usage"],
           "train_s": time.perf_counter() - start}
    if out[0].codes is not None:
        codes = torch.cat([o.codes for o in out])
        row.update(usage=codebook_usage(codes, v.k), perplexity=codebook_perplexity(codes, v.k),
                   usage_ceiling=usage_ceiling(v.k, codes.numel()))
    print(f"{v.name}: " + ", ".join(f"{k} {x:.4g}" for k, x in row.items() if isinstance(x, float)), flush=True)
    return row


def measure_speed(rows: list[dict], args) -> None:
    """Training steps/s and encode images/s of every variant, in this one process, round robin and
    best of ``--speed_rounds``: on a shared machine each variant then sees the same load (the
    parallel quality runs cannot be timed fairly). Speed does not depend on the trained weights."""
    batches = list(train_batches(args, args.speed_steps + 1))
    encode_pixels = held_out(args, 0)[:512]
    trainers = {row["name"]: build_trainer(variant(row["name"]), args, args.steps) for row in rows}
    for trainer in trainers.values():
        trainer.step(batches[0], 0)  # untimed warm-up: k-means init, allocator, oneDNN kernels
    best = {name: [float("inf"), float("inf")] for name in trainers}
    for _ in range(args.speed_rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for i, batch in enumerate(batches[1:]):
                trainer.step(batch, 1 + i)
            best[name][0] = min(best[name][0], (time.perf_counter() - start) / args.speed_steps)
            if not isinstance(trainer.vqgan.quantize, NoQuantizer):
                trainer.vqgan.eval()
                start = time.perf_counter()
                for pixels in encode_pixels.split(64):  # the library's VQ holds [N, K] distances: 8.6 GB
                    trainer.vqgan.encode(pixels)  # for 512 crops at K = 65,536 (OOM-killed the run)
                best[name][1] = min(best[name][1], (time.perf_counter() - start) / len(encode_pixels))
    for row in rows:
        step_s, encode_s = best[row["name"]]
        row["steps_s"] = 1 / step_s
        if encode_s < float("inf"):
            row["encode_img_s"] = 1 / encode_s


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(rows: list[dict], reference: str) -> str:
    """Markdown table, one block per K asked for; deltas and ratios against ``reference@K``."""
    refs = {r["group"]: r for r in rows if r["name"].split("@")[0] == reference}

    def ratio(r, key):
        ref = refs.get(r["group"])
        if ref is None or r.get(key) is None or not ref.get(key):
            return None
        return r[key] / ref[key]

    lines = ["| K | variant | PSNR dB (Δ ref) | SSIM | usage (uniform ceiling) | perplexity | train steps/s (× ref) | "
             "encode img/s (× ref) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: r["group"]):
        ref = refs.get(r["group"])
        d_psnr = None if ref is None else r["psnr"] - ref["psnr"]
        lines.append(
            f"| {r['k']} | {r['description']} | {r['psnr']:.2f} ({fmt(d_psnr, '+.2f')}) | {r['ssim']:.3f} | "
            f"{fmt(r.get('usage'), '.1%')} ({fmt(r.get('usage_ceiling'), '.1%')}) | "
            f"{fmt(r.get('perplexity'), '.0f')} | "
            f"{fmt(r.get('steps_s'), '.2f')} ({fmt(ratio(r, 'steps_s'), '.2f')}) | "
            f"{fmt(r.get('encode_img_s'), '.0f')} ({fmt(ratio(r, 'encode_img_s'), '.2f')}) |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, checked on these rows."""
    out = []
    by = {r["name"]: r for r in rows}
    for k in sorted({r["group"] for r in rows}):
        ours = next((r for r in rows if r["name"].startswith("ours@") and r["group"] == k), None)
        if ours is not None and ours.get("usage") is not None and k >= 16384:
            ok = ours["usage"] >= 0.99
            out.append(f"K={k}: our VQ usage {ours['usage']:.1%} (>= 99%: {'met' if ok else 'MISSED'}; a uniform "
                       f"distribution reaches {ours['usage_ceiling']:.1%} on these tokens)")
        new = [r for r in rows if r["name"].split("@")[0] in ("fsq", "lfq", "simvq") and r["group"] == k]
        if ours is not None and new:
            best = max(new, key=lambda r: r["psnr"])
            ok = best["psnr"] >= ours["psnr"]
            out.append(f"K={k}: best new quantizer {best['name']} {best['psnr'] - ours['psnr']:+.2f} dB vs our VQ "
                       f"({'met' if ok else 'MISSED'})")
    for name, r in by.items():
        if name.split("@")[0] in ("fsq", "lfq") and r.get("usage") is not None:
            out.append(f"{name}: usage {r['usage']:.1%} (100% by construction once trained: "
                       f"{'met' if r['usage'] >= 0.999 else 'MISSED'}; uniform ceiling {r['usage_ceiling']:.1%})")
    return out


def train_all(specs: list[str], args, steps: int) -> list[dict]:
    jobs = max(1, min(args.jobs, len(specs)))
    if jobs == 1:
        return [quality(s, args, steps) for s in specs]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(quality, specs, [args] * len(specs), [steps] * len(specs)))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--crop", type=int, default=32, choices=[32, 64], help="crop side in pixels")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 16384, 65536],
                        help="codebook sizes K for variants given without @K")
    parser.add_argument("--variants", nargs="+", default=DEFAULT, help=f"family or family@K; families: {FAMILIES}")
    parser.add_argument("--reference", default="vqp", choices=FAMILIES)
    parser.add_argument("--long_steps", type=int, default=0, help="then train the best two rows again this long")
    parser.add_argument("--eval_samples", type=int, default=0, help="0: enough for --tokens_per_code")
    parser.add_argument("--tokens_per_code", type=int, default=4, help="held-out tokens per code (usage, perplexity)")
    parser.add_argument("--speed_steps", type=int, default=10, help="timed training steps per variant and round")
    parser.add_argument("--speed_rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="variants trained in parallel")
    args = parser.parse_args(argv)
    specs = [s if "@" in s else f"{s}@{k}" for s in args.variants for k in ([0] if "@" in s else args.sizes)]
    for s in specs:
        variant(s)  # fails on a bad name before any training
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()

    rows = train_all(specs, args, args.steps)
    measure_speed(rows, args)
    held = "/".join(str(n) for n in sorted({eval_samples(args, r["k"]) for r in rows}))
    print(f"\n{args.steps} steps x batch {args.batch_size}, {held} held-out {args.crop} px crops "
          f"({tokens_per_crop(args)} tokens each); {datetime.date.today()}, {platform.machine()} x {os.cpu_count()} "
          f"cores, {min(args.jobs, len(specs))} variants at a time x {args.threads} thread(s), torch "
          f"{torch.__version__}; {time.perf_counter() - wall:.0f} s wall\n")
    print(table(rows, args.reference))
    print("\n" + "\n".join(targets(rows)))
    if args.long_steps:
        best = sorted((r for r in rows if r.get("usage") is not None), key=lambda r: -r["psnr"])[:2]
        long_rows = train_all([r["name"] for r in best], args, args.long_steps)
        for r, short in zip(long_rows, best):
            r.update(steps_s=short.get("steps_s"), encode_img_s=short.get("encode_img_s"))
        print(f"\nthe best two, {args.long_steps} steps (speed from the short run):\n")
        print(table(long_rows, args.reference))
        rows += long_rows
    return rows


if __name__ == "__main__":
    main()
