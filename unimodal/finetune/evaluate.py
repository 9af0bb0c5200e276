"""Held-out loss per task, exact under data parallelism."""

from __future__ import annotations

import torch


@torch.no_grad()
def evaluate(accelerator, model, loaders: dict[str, torch.utils.data.DataLoader]) -> dict[str, float]:
    """Mean held-out loss per target token, per task: ``{"eval/t2i": 2.31, ...}``.

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
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()  # [B, T, V]
            targets = labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
            )  # [B, T-1]
            per_row = torch.stack([losses.sum(1), (targets != -100).sum(1)], 1).double()  # [B, 2]
            total += accelerator.gather_for_metrics(per_row).sum(0)
        results[f"eval/{task}"] = (total[0] / total[1].clamp(min=1)).item()
    model.train(was_training)
    return results
