"""FSDP2 (``recipes/configs/accelerate/fsdp.yaml``, ``fsdp_version: 2``) launched for real on CPU:
2 processes over gloo, final weights equal to 2-process DDP's, and a SIGKILLed run resuming to the
weights of an uninterrupted one. The launch helpers are tests/launching.py's (same recipe command)."""

import subprocess
import time
from pathlib import Path

import pytest
import torch
from launching import REPO, command, env, kill_tree, run, weights

from unimodal.offline import train_text_tokenizer

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU launch; on GPUs see test_fsdp_on_gpus"),
]

# Checkpointed layers with the MLPs' backward in chunks of 64 tokens (FSDP2's hooks around each
# MLP unshard its weights for the chunks); the DDP reference runs plain layers.
CHECKPOINTED = ("--gradient_checkpointing", "true", "--mlp_chunk_size", "64")


def fsdp_command(data_root: Path, out: Path, *extra: str) -> list[str]:
    """The recipe under fsdp.yaml with 2 processes (the config says 8, one per GPU of a machine)."""
    cmd = command("fsdp.yaml", data_root, out, *extra)
    at = cmd.index("--config_file")
    return [*cmd[:at], "--num_processes", "2", *cmd[at:]]


def assert_sharded_checkpoints(out: Path) -> None:
    """Sharded for real: accelerate wrote FSDP's distributed checkpoint (one file per rank), not
    the plain model file a DDP run writes."""
    for checkpoint in (out / "checkpoints").iterdir():
        shards = sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))
        assert shards == ["__0_0.distcp", "__1_0.distcp"], f"{checkpoint}: {shards}"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, finetune_data_factory):
    root = tmp_path_factory.mktemp("fsdp")
    finetune_data_factory(root, train_text_tokenizer(), num_digits=200)
    return root


@pytest.fixture(scope="module")
def fsdp_run(data_root):
    out = data_root / "fsdp"
    return out, run(fsdp_command(data_root, out, *CHECKPOINTED))


def test_fsdp2_shards_and_matches_ddp(fsdp_run, data_root):
    out, proc = fsdp_run
    assert_sharded_checkpoints(out)
    assert "step 30: eval/t2i" in proc.stdout + proc.stderr
    ddp = data_root / "ddp"
    run(command("ddp_cpu.yaml", data_root, ddp))
    reference, got = weights(ddp), weights(out)
    assert reference.keys() == got.keys()
    for name in reference:  # same data, seed, clipping, fp32: reduce-scatter vs all-reduce order only
        torch.testing.assert_close(got[name], reference[name], rtol=0, atol=1e-6, msg=name)


def test_fsdp2_sigkill_then_relaunch_resumes_to_the_same_weights(fsdp_run, data_root):
    out = data_root / "fsdp_killed"
    cmd = fsdp_command(data_root, out, *CHECKPOINTED)
    launcher = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    first = out / "checkpoints" / "step-00000003"
    deadline = time.monotonic() + 300
    while not first.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.exists(), "the run never wrote its first checkpoint"
    kill_tree(launcher.pid)
    assert not (out / "final").exists(), "the run finished before the kill: raise STEPS"
    resumed = run(fsdp_command(data_root, out, *CHECKPOINTED))
    assert "resuming at step" in resumed.stdout + resumed.stderr
    assert_sharded_checkpoints(out)
    reference, got = weights(fsdp_run[0]), weights(out)
    for name in reference:  # sharded weights, optimizer state, data order and RNG all restored
        assert torch.equal(got[name], reference[name]), name
