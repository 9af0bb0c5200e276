"""Held-out loss per task, exact under data parallelism."""

from __future__ import annotations

import torch

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
