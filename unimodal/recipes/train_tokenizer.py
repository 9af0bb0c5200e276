"""Train a VQ-GAN image tokenizer (encoder, codebook, decoder + patch discriminator).

    unimodal train-tokenizer --config train_tokenizer                        # installed package
    unimodal train-tokenizer --config train_tokenizer --model.codebook_size 256 --max_steps 2000
    python recipes/train_tokenizer.py --config recipes/configs/train_tokenizer.yaml   # from a clone
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        -m unimodal.recipes.train_tokenizer --config train_tokenizer      # 2 CPU processes

The architecture is the ``model:`` section, the keyword arguments of `unimodal.VQGANConfig`.
Data: ``--data shipped`` (default: crops of the photos inside scikit-learn / scikit-image), a
folder of images, a ``save_to_disk`` folder or a Hub dataset. Relaunching the same command resumes
from the latest checkpoint in ``output_dir/checkpoints``. Writes TensorBoard logs, reconstruction
grids (``samples/``), held-out metrics (``eval/*.json``, ``eval_results.json``) and the final
model (``final/``, loadable with ``VQGAN.from_pretrained``). Config reference: docs/tokenizer.md.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from unimodal.errors import UserError, bad_input
from unimodal.evaluation.metrics import reconstruction_metrics
from unimodal.image_data import ImageDataArguments, load_image_datasets
from unimodal.images import make_grid, tensor_to_pil
from unimodal.training import (
    CheckpointManager,
    Preemption,
    RunArguments,
    infinite_batches,
    make_accelerator,
    parse_config,
    return_large_blocks_to_the_system,
)
from unimodal.vq.losses import VQGANLoss, VQGANLossConfig
from unimodal.vq.model import VQGAN
from unimodal.vq.train import VQGANModelArguments, VQGANTrainConfig, VQGANTrainer, codebook_fingerprint


@dataclass
class TokenizerRunArguments(RunArguments):
    """The shared `RunArguments` (output_dir, seed, mixed_precision, batch sizes, log/eval/save
    steps, keep_last, report_to, Hub upload) with this recipe's defaults, plus its own knobs."""

    output_dir: str = "outputs/tokenizer"
    per_device_batch_size: int = 32
    eval_batch_size: int = 64
    eval_steps: int = 500  # held-out PSNR / SSIM / codebook usage / perplexity
    save_steps: int = 500
    sample_steps: int = 100  # reconstruction grid PNG
    num_workers: int = 0
    ssim_sigma: float = 1.5  # Gaussian window of SSIM; 11 px at 1.5, use 0.5 for images under 11 px
    num_samples_in_grid: int = 8


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    model_args, data_args, loss_config, train_config, args = parse_config(
        (VQGANModelArguments, ImageDataArguments, VQGANLossConfig, VQGANTrainConfig, TokenizerRunArguments), argv,
        prog=prog, description=__doc__)
    if args.mixed_precision not in ("no", "bf16"):
        raise UserError(f"mixed_precision must be 'no' or 'bf16', got {args.mixed_precision!r} "
                         "(fp16 is unusably slow on CPU and unstable for GANs)")
    out = Path(args.output_dir)
    accelerator = make_accelerator(args.mixed_precision, 1, out, None if args.report_to == "none" else args.report_to,
                                   seed=args.seed)

    # 1. Model, objective and data; sizes are checked here, before any training step.
    model = model_args.build(data_args.image_size)
    return_large_blocks_to_the_system(model)  # large models: freed activations leave the resident set
    model.check_pixels(torch.zeros(1, 3, data_args.image_size, data_args.image_size))
    loss_fn = VQGANLoss(loss_config)
    side = loss_fn.discriminator.min_side
    if loss_config.disc_start < train_config.max_steps and data_args.image_size < side:
        raise UserError(f"image_size {data_args.image_size} is below the discriminator's minimum {side} px "
                         f"(disc_layers={loss_config.disc_layers}); lower disc_layers or disc_start >= max_steps")
    with bad_input("data"):
        train_set, eval_set = load_image_datasets(data_args, seed=args.seed)
    eval_pixels = torch.stack([eval_set[i] for i in range(min(len(eval_set), data_args.eval_samples))])
    skipped = sum(len(getattr(d, "skipped", [])) for d in (train_set, eval_set))
    # Its own generator: the loader's per-epoch draw then leaves the global RNG (dead-code restarts)
    # alone, so a resumed run continues the exact random stream of an uninterrupted one.
    loader = accelerator.prepare(DataLoader(train_set, args.per_device_batch_size, shuffle=True, drop_last=True,
                                            num_workers=args.num_workers,
                                            generator=torch.Generator().manual_seed(args.seed)))
    if len(loader) == 0:
        raise UserError(f"{len(train_set)} training images do not fill one batch of {args.per_device_batch_size} per "
                        f"process x {accelerator.num_processes} processes; lower per_device_batch_size or add images")
    fixed = eval_pixels[: args.num_samples_in_grid]

    # 2. Two optimisers (VQ-GAN, discriminator) and the weight EMA; then resume from the latest checkpoint.
    config = {f.name: getattr(a, f.name) for a in (model_args, data_args, loss_config, train_config, args)
              for f in dataclasses.fields(a)}
    # Checked before resuming: damaged files, another config or a process count it cannot continue.
    checkpoints = CheckpointManager(out / "checkpoints", keep_last=args.keep_last, config=config)
    trainer = VQGANTrainer(accelerator, model, loss_fn, train_config, checkpoints)
    state = checkpoints.load(accelerator)
    if state is not None:
        with bad_input(f"checkpoint {checkpoints.latest()}"):
            trainer.load_state_tensors(checkpoints.load_tensors())
    step = state["step"] if state else 0
    accelerator.init_trackers("train_tokenizer", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                         for k, v in config.items()})
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(config, indent=2))
        params = sum(p.numel() for p in trainer.vqgan.parameters()) / 1e6
        accelerator.print(f"VQ-GAN {params:.2f}M params, {trainer.vqgan.num_image_tokens} tokens/image; "
                          f"{len(train_set)} training and {len(eval_pixels)} held-out images "
                          f"({skipped} unreadable skipped)" + (f"; resuming at step {step}" if step else ""))

    def evaluate(step: int) -> dict:
        """Held-out metrics of the evaluated weights, on the main process (others wait)."""
        metrics = {}
        if accelerator.is_main_process:
            model_eval = cast(VQGAN, trainer.eval_model).eval()  # the trainer got a VQGAN
            with accelerator.autocast():
                report = reconstruction_metrics(model_eval, eval_pixels, args.eval_batch_size, args.ssim_sigma)
            metrics = {"step": step, **dataclasses.asdict(report), "num_images": len(eval_pixels),
                       "weights": "ema" if trainer.ema is not None else "trained"}
            (out / "eval").mkdir(parents=True, exist_ok=True)
            (out / "eval" / f"step-{step:08d}.json").write_text(json.dumps(metrics, indent=2))
            accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=step)
        accelerator.wait_for_everyone()
        return metrics

    def save_grid(step: int) -> None:
        """Originals (top row) over reconstructions (bottom row) of fixed held-out images."""
        if accelerator.is_main_process:
            model_eval = cast(VQGAN, trainer.eval_model).eval()  # the trainer got a VQGAN
            with accelerator.autocast():
                _, recon = model_eval.reconstruct(fixed)  # [n, 3, H, W] on the CPU
            grid = make_grid(tensor_to_pil(torch.cat([fixed, recon])), ncols=len(fixed))
            (out / "samples").mkdir(parents=True, exist_ok=True)
            grid.save(out / "samples" / f"step-{step:08d}.png")

    # 3. Train. Each step updates the VQ-GAN, then (from disc_start) the discriminator.
    progress = tqdm(total=train_config.max_steps, initial=step, disable=not accelerator.is_main_process,
                    desc="tokenizer")
    with Preemption(args.preemption_grace_s) as preemption:  # SIGTERM / SIGUSR1: checkpoint, exit 75
        for _, pixels in infinite_batches(accelerator, loader, step, len(loader)):
            if step >= train_config.max_steps:
                break
            logs = trainer.step(pixels, step)
            step += 1
            progress.update()
            if step % args.log_steps == 0 or step == train_config.max_steps:
                progress.set_postfix(rec=f"{logs['reconstruction_loss']:.4f}", usage=f"{logs['usage']:.2f}")
                accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=step)
            if step % args.sample_steps == 0 or step == train_config.max_steps:
                save_grid(step)
            if args.eval_steps and step % args.eval_steps == 0 and step < train_config.max_steps:
                evaluate(step)
            if step % args.save_steps == 0 or step == train_config.max_steps:
                checkpoints.save(accelerator, step, tensors=trainer.state_tensors())
            if step < train_config.max_steps and preemption.should_stop(accelerator):
                raise preemption.stop(accelerator, checkpoints, step, tensors=trainer.state_tensors())
        progress.close()

    # 4. Final evaluation, rank-consistency check of the codebook, and the save_pretrained folder.
    fingerprints = gather_object([codebook_fingerprint(trainer.vqgan)])
    if len(set(fingerprints)) > 1:
        raise RuntimeError(f"codebooks differ across ranks ({fingerprints}); the quantizer's statistics "
                           "must be all-reduced (is torch.distributed initialised before the first step?)")
    metrics = evaluate(step)
    final = out / "final"
    if accelerator.is_main_process:
        (out / "eval_results.json").write_text(json.dumps(
            {**metrics, "skipped_images": skipped, "codebook_fingerprints": fingerprints}, indent=2))
        cast(VQGAN, trainer.eval_model).save_pretrained(final)
        accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                       if isinstance(v, float)) + f"; saved {final}")
        if args.push_to_hub:
            from unimodal.hub import push_folder_to_hub

            push_folder_to_hub(final, args.hub_model_id or out.name, private=args.hub_private,
                               commit_message=f"VQ-GAN tokenizer after {step} steps")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


if __name__ == "__main__":
    from unimodal.cli import run_recipe

    run_recipe(main)
