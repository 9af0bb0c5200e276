"""The VQ-GAN train step and recipes/train_tokenizer.py: stop + resume, 2 processes, bad input."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from unimodal.training import CheckpointManager, make_accelerator
from unimodal.vq import VQGAN, VQGANConfig
from unimodal.vq.losses import VQGANLoss, VQGANLossConfig
from unimodal.vq.train import VQGANTrainConfig, VQGANTrainer, codebook_fingerprint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "configs" / "train_tokenizer_tiny.yaml"


def _recipe():
    from unimodal.recipes import train_tokenizer

    return train_tokenizer


def _tiny_trainer(tmp_path, disc_start=1, **train):
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(codebook_size=32, image_size=16, ch=16, ch_mult=[1, 2], num_res_blocks=1,
                           z_channels=16, embed_dim=4, num_groups=8, dead_code_threshold=1))
    loss = VQGANLoss(VQGANLossConfig(disc_start=disc_start, disc_layers=2, disc_channels=8))
    acc = make_accelerator(project_dir=tmp_path, log_with=None)
    config = VQGANTrainConfig(learning_rate=3e-3, disc_learning_rate=1e-3, max_steps=100, **train)
    return VQGANTrainer(acc, vq, loss, config, CheckpointManager(tmp_path / "ckpt"))


def _smooth_batch(n=8, side=16):
    # Smooth colour gradients: learnable in a few dozen steps by a tiny autoencoder.
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1, 1, side)
    a, b, c = (torch.rand(3, n, 3, 1, 1, generator=g) * 2 - 1)
    return (a * ramp.view(1, 1, side, 1) + b * ramp.view(1, 1, 1, side) + c).clamp(-1, 1) * 0.8


def test_train_step_updates_both_networks_and_ema(tmp_path):
    trainer = _tiny_trainer(tmp_path, disc_start=1, weight_ema_decay=0.5)
    pixels = _smooth_batch()
    vq_before = [p.detach().clone() for p in trainer.vqgan.parameters()]
    disc_before = [p.detach().clone() for p in trainer.loss.discriminator.parameters()]
    ema_before = [p.detach().clone() for p in trainer.ema.model.parameters()]
    logs = trainer.step(pixels, 0)  # before disc_start: generator only
    assert "disc_loss" not in logs and logs["generator_loss"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(disc_before, trainer.loss.discriminator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(vq_before, trainer.vqgan.parameters()))
    logs = trainer.step(pixels, 1)  # discriminator on
    assert {"disc_loss", "logits_real", "adaptive_weight", "disc_grad_norm"} <= set(logs)
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, trainer.loss.discriminator.parameters()))
    # EMA = 0.5 * EMA + 0.5 * weights: between the start and the current weights, equal to neither.
    moved = [(e, b, p) for e, b, p in zip(trainer.ema.model.parameters(), ema_before, trainer.vqgan.parameters())
             if p.requires_grad and not torch.equal(b, p)]
    assert moved and all(not torch.equal(e, b) and not torch.equal(e, p) for e, b, p in moved)


def test_train_step_reduces_the_reconstruction_loss(tmp_path):
    trainer = _tiny_trainer(tmp_path, disc_start=10_000)
    pixels = _smooth_batch()
    losses = [trainer.step(pixels, s)["reconstruction_loss"] for s in range(40)]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


def test_state_tensors_round_trip_and_fingerprint(tmp_path):
    trainer = _tiny_trainer(tmp_path, weight_ema_decay=0.9)
    trainer.step(_smooth_batch(), 0)
    saved = trainer.state_tensors()
    # The non-persistent usage window (which state_dict skips) and the EMA copy are in there.
    assert "vqgan.quantize.recent_picks" in saved and any(k.startswith("ema.") for k in saved)
    fingerprint = codebook_fingerprint(trainer.vqgan)
    trainer.step(_smooth_batch(), 1)
    assert codebook_fingerprint(trainer.vqgan) != fingerprint
    trainer.load_state_tensors(saved)
    for name, tensor in trainer._extra_tensors().items():
        assert torch.equal(tensor, saved[name]), name
    with torch.no_grad():
        trainer.vqgan.quantize.recent_picks[0, 0] += 1  # a buffer alone changes the fingerprint
    assert codebook_fingerprint(trainer.vqgan) != codebook_fingerprint(trainer.ema.model)
    with pytest.raises(ValueError, match="checkpoint lacks"):
        trainer.load_state_tensors({k: v for k, v in saved.items() if not k.startswith("ema.")})


def test_recipe_stops_resumes_and_matches_an_uninterrupted_run(tmp_path, monkeypatch, fake_hub):
    recipe = _recipe()
    args = ["--config", str(TINY), "--report_to", "none"]
    full = recipe.main([*args, "--output_dir", str(tmp_path / "full")])
    assert json.loads((tmp_path / "full" / "eval_results.json").read_text())["step"] == 4

    # Crash after the step-2 checkpoint (fault injection around the real step), then relaunch.
    real_step, ran = VQGANTrainer.step, []

    def crash_at_2(self, pixels, step):
        if step == 2 and "crash" not in ran:
            ran.append("crash")
            raise KeyboardInterrupt
        ran.append(step)
        return real_step(self, pixels, step)

    monkeypatch.setattr(VQGANTrainer, "step", crash_at_2)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        recipe.main([*args, "--output_dir", str(out)])
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    resumed = recipe.main([*args, "--output_dir", str(out), "--push_to_hub", "true", "--hub_model_id", "tok",
                           "--hub_private", "true"])
    assert ran == [0, 1, "crash", 2, 3]  # the step count continued from the checkpoint
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["step-00000002.json", "step-00000004.json"]
    (upload,) = fake_hub.uploads
    assert (upload.repo_id, upload.private, upload.commit_message) == ("me/tok", True, "VQ-GAN tokenizer after 4 steps")
    assert upload.files == {"config.json", "model.safetensors"}

    # Identical to the uninterrupted run: weights, EMA, optimiser and discriminator all restored.
    a, b = VQGAN.from_pretrained(full), VQGAN.from_pretrained(resumed)
    uploaded = VQGAN.from_pretrained(upload.folder)  # what went up is the final tokenizer
    for (name, p), q, r in zip(a.state_dict().items(), b.state_dict().values(), uploaded.state_dict().values()):
        assert torch.equal(p, q) and torch.equal(q, r), name
    ckpt_a = CheckpointManager(tmp_path / "full" / "checkpoints").load_tensors()
    ckpt_b = CheckpointManager(out / "checkpoints").load_tensors()
    assert all(torch.equal(ckpt_a[k], ckpt_b[k]) for k in ckpt_a)
    disc_a, disc_b = (load_file(root / "checkpoints" / "step-00000004" / "model_1.safetensors")
                      for root in (tmp_path / "full", out))  # accelerate's second model: the discriminator
    assert disc_a.keys() == disc_b.keys() and all(torch.equal(disc_a[k], disc_b[k]) for k in disc_a)
    grid = Image.open(out / "samples" / "step-00000004.png")
    assert grid.size[0] > 8 * 16 and grid.size[1] > 2 * 16  # 8 originals over 8 reconstructions


def test_bad_sizes_fail_before_training(tmp_path):
    recipe = _recipe()
    args = ["--config", str(TINY), "--report_to", "none", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="not divisible by the downsample factor 4"):
        recipe.main([*args, "--model.ch_mult", "1", "2", "2", "--image_size", "18"])
    with pytest.raises(ValueError, match="below the discriminator's minimum 24 px"):
        recipe.main([*args, "--disc_layers", "3"])
    with pytest.raises(ValueError, match="do not fill one batch of 512"):
        recipe.main([*args, "--per_device_batch_size", "512"])
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_recipe_on_a_folder_skips_corrupt_files_or_fails_when_strict(tmp_path):
    recipe = _recipe()
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(12):
        color = (i * 20, 100, 50) if i % 3 else i * 20
        Image.new("RGB" if i % 3 else "L", (20 + i, 20), color).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    args = ["--config", str(TINY), "--report_to", "none", "--data", str(folder), "--eval_fraction", "0.3",
            "--max_steps", "1", "--per_device_batch_size", "4", "--min_scale", "1.0", "--max_scale", "1.0"]
    with pytest.raises(ValueError, match="could not be read.*broken.jpg"):
        recipe.main([*args, "--output_dir", str(tmp_path / "strict"), "--strict", "true"])
    with pytest.warns(UserWarning, match="unreadable image files"):
        recipe.main([*args, "--output_dir", str(tmp_path / "lenient")])
    results = json.loads((tmp_path / "lenient" / "eval_results.json").read_text())
    assert results["step"] == 1 and results["num_images"] >= 1 and results["skipped_images"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_keep_codebooks_identical(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(_free_port()),
           str(ROOT / "recipes" / "train_tokenizer.py"),
           "--config", str(TINY), "--output_dir", str(out), "--report_to", "none",
           "--model.ema_decay", "0.9", "--model.kmeans_init", "true"]  # EMA codebook + k-means: every synced path
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    fingerprints = results["codebook_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    vq = VQGAN.from_pretrained(out / "final")
    assert vq.config.ema_decay == 0.9 and bool(vq.quantize.initted)
    assert 0 < results["codebook_usage"] <= 1 and results["step"] == 4
