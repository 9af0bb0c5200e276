from dataclasses import dataclass, field

import pytest
import torch
from torch.utils.data import DataLoader

from unimodal.training import (
    CheckpointManager, NonFiniteLossError, check_finite, cosine_with_warmup, infinite_batches,
    make_accelerator, parse_config,
)


@dataclass
class A:
    lr: float = 1e-3
    name: str = "x"


@dataclass
class B:
    steps: int = 10
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    bf16: bool = False


def test_parse_config_yaml_then_cli(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.5\nsteps: 3\nsizes: [4, 5]\n")
    a, b = parse_config((A, B), ["--config", str(cfg), "--steps", "7", "--bf16", "true"])
    assert (a.lr, a.name, b.steps, b.sizes, b.bf16) == (0.5, "x", 7, [4, 5], True)


def test_parse_config_rejects_unknown_keys(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.5\n")
    with pytest.raises(ValueError, match="unknown keys.*learning_rate"):
        parse_config((A, B), ["--config", str(cfg)])
    with pytest.raises(ValueError, match="unrecognised"):
        parse_config((A, B), ["--nope", "1"])


def test_cosine_schedule_shape():
    values = [cosine_with_warmup(s, 10, 110) for s in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.5) and values[110] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_check_finite_names_the_checkpoint(tmp_path):
    check_finite(torch.tensor(1.0), 3)
    with pytest.raises(NonFiniteLossError, match="step 5.*no checkpoint"):
        check_finite(torch.tensor(float("nan")), 5, CheckpointManager(tmp_path))


def _run(tmp_path, steps, resume):
    acc = make_accelerator(project_dir=tmp_path, log_with=None, seed=1)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.arange(40, dtype=torch.float32).view(10, 4) / 40
    loader = DataLoader(data, batch_size=3, shuffle=True)
    model, opt, loader = acc.prepare(model, opt, loader)
    ckpt = CheckpointManager(tmp_path / "ckpt")
    start = (ckpt.load(acc) or {"step": 0})["step"] if resume else 0
    seen = []
    for step, batch in infinite_batches(acc, loader, start, len(loader)):
        if step == steps:
            break
        seen.append(batch.sum().item())
        loss = model(batch).pow(2).mean()
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        if step + 1 == 5:
            ckpt.save(acc, step + 1)
    return model, seen


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path):
    full, seen_full = _run(tmp_path / "a", 9, resume=False)
    _run(tmp_path / "b", 5, resume=False)  # "crashes" right after the step-5 checkpoint
    assert [p.name for p in (tmp_path / "b" / "ckpt").iterdir()] == ["step-00000005"]
    resumed, seen_rest = _run(tmp_path / "b", 9, resume=True)
    assert seen_rest == seen_full[5:]  # the data order continues across epochs
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_tensors_round_trip_as_safetensors(tmp_path):
    acc = make_accelerator(project_dir=tmp_path, log_with=None)
    acc.prepare(torch.nn.Linear(2, 2))
    ckpt = CheckpointManager(tmp_path / "ckpt")
    assert ckpt.load_tensors() == {}
    extra = {"ema.weight": torch.randn(2, 2), "step": torch.tensor(7), "flag": torch.tensor(True)}
    path = ckpt.save(acc, 3, tensors=extra)
    assert (path / "tensors.safetensors").exists() and not list(path.glob("custom_checkpoint_*"))
    ckpt.save(acc, 4)  # no tensors: none written, none read back
    loaded = ckpt.load_tensors(path)
    assert loaded.keys() == extra.keys() and all(torch.equal(loaded[k], v) for k, v in extra.items())
    assert ckpt.load_tensors() == {}
