"""What the fine-tuning loop does at an evaluation step: the held-out loss per task (exact under
data parallelism) and a grid of images from fixed prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..generation import SamplingConfig, generate_images
from ..images import make_grid
from ..training.loss import batch_loss_sums


@torch.no_grad()
def evaluate(accelerator, model, loaders: dict[str, torch.utils.data.DataLoader], loss: str = "chunked",
             chunk_size: int | None = None) -> dict[str, float]:
    """Mean held-out loss per target token, per task: ``{"eval/t2i": 2.31, ...}``; ``loss`` and
    ``chunk_size`` as in `unimodal.training.loss.batch_loss`.

    Token sums and counts are summed over all processes, so the value does not depend on the
    number of processes (accelerate's duplicated samples in a last uneven batch are not counted:
    every process runs the same number of batches, which ZeRO-3 needs, padding included).
    """
    was_training = model.training
    model.eval()
    results = {}
    for task, loader in loaders.items():
        total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)  # [loss sum, tokens]
        for batch in loader:
            sums, counts = batch_loss_sums(model, batch, loss, chunk_size)  # [B], [B]
            per_row = torch.stack([sums.double(), counts.double()], 1)  # [B, 2]
            total += accelerator.gather_for_metrics(per_row).sum(0)
        results[f"eval/{task}"] = (total[0] / total[1].clamp(min=1)).item()
    model.train(was_training)
    return results


def save_samples(accelerator, model, processor, prompts: list[str], sampling: SamplingConfig, output_dir: Path,
                 step: int, seed: int = 0, tensorboard: bool = False) -> Path:
    """Images from the fixed ``prompts`` (one process draws them): a PNG grid
    ``output_dir/samples/step-<step>.png``, also logged to TensorBoard if ``tensorboard``. Returns the
    grid's path."""
    path = Path(output_dir) / "samples" / f"step-{step:08d}.png"
    if accelerator.is_main_process:
        lm = accelerator.unwrap_model(model)
        lm.eval()
        with torch.no_grad(), accelerator.autocast():
            images = generate_images(lm, processor, prompts, preset=sampling, seed=seed, progress=False)
        lm.train()
        grid = make_grid(images, ncols=len(images))
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        if tensorboard:
            writer = accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
    accelerator.wait_for_everyone()
    return path
