"""The finetune recipe launched for real (recipes/finetune.py; -m unimodal.recipes.finetune too):
2-process DDP, DeepSpeed ZeRO-2 and ZeRO-3 on CPU (gloo), LoRA under ZeRO-3, SIGKILL + relaunch
resuming exactly, NaN stop, FSDP on GPUs."""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from launching import REPO, command, env, kill_tree, run, weights
from transformers import AutoModelForCausalLM

from unimodal import UnimodalProcessor
from unimodal.data import PROCESSOR_SUBFOLDER
from unimodal.offline import train_text_tokenizer


def assert_loadable(out: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    processor = UnimodalProcessor.from_pretrained(out / "final")
    ids = torch.tensor([processor.text_to_image_ids("a handwritten digit three")])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert "max_steps: 30" in (out / "final" / "README.md").read_text()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, finetune_data_factory):
    root = tmp_path_factory.mktemp("ft_launch")
    finetune_data_factory(root, train_text_tokenizer(), num_digits=200)
    return root


@pytest.fixture(scope="module")
def ddp_run(data_root):
    """The reference: 2-process DDP over gloo, full fine-tuning, uninterrupted."""
    out = data_root / "ddp"
    proc = run(command("ddp_cpu.yaml", data_root, out))
    return out, proc


def test_ddp_two_processes_train_and_save_a_loadable_model(ddp_run):
    out, proc = ddp_run
    assert "step 30: eval/t2i" in proc.stdout + proc.stderr
    assert_loadable(out)
    # keep_last=2: the two newest checkpoints, complete (state.json written last)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000024", "step-00000027"]


def test_deepspeed_zero2_matches_ddp(ddp_run, data_root):
    out = data_root / "zero2"
    run(command("zero2.yaml", data_root, out))
    assert_loadable(out)
    reference, got = weights(ddp_run[0]), weights(out)
    assert reference.keys() == got.keys()
    for name in reference:  # same data, seed, clipping and fp32 math: only reduction order differs
        torch.testing.assert_close(got[name], reference[name], rtol=0, atol=1e-6, msg=name)


def test_deepspeed_zero3_lora_trains_new_rows_and_adapters(data_root):
    out, model_loss = data_root / "zero3_lora", data_root / "zero3_lora_model_loss"
    lora = ("--use_lora", "true", "--lora_r", "4")
    # The chunked loss in chunks of 64 positions (a few head calls per step, not as many on each
    # rank, each gathering the head and its untied trainable-token rows, recomputed in backward),
    # checkpointed layers (whose MLPs keep their plain backward under ZeRO-3 whatever
    # mlp_chunk_size says), against the model's own loss and plain layers.
    run(command("zero3.yaml", data_root, out, *lora, "--loss_chunk_size", "64", "--gradient_checkpointing", "true",
                "--mlp_chunk_size", "64"))
    run(command("zero3.yaml", data_root, model_loss, *lora, "--loss", "model"))
    assert_loadable(out)
    got = weights(out)
    reference = weights(model_loss)
    assert reference.keys() == got.keys()
    for name in reference:  # same fp32 math summed in another order (seen: <= 1.5e-7 after 30 steps)
        torch.testing.assert_close(got[name], reference[name], rtol=0, atol=1e-6, msg=name)
    # The same tiny LM before training: built from the config with the same seed, then extended.
    from unimodal.finetune import ModelArguments, load_model_and_processor

    base, processor = load_model_and_processor(
        ModelArguments(tokenizer_name_or_path=str(data_root / "text_tokenizer"), build={"hidden_size": 32}),
        UnimodalProcessor.from_pretrained(data_root / "data" / PROCESSOR_SUBFOLDER))
    before = base.state_dict()
    again, _ = load_model_and_processor(
        ModelArguments(tokenizer_name_or_path=str(data_root / "text_tokenizer"), build={"hidden_size": 32}),
        UnimodalProcessor.from_pretrained(data_root / "data" / PROCESSOR_SUBFOLDER))
    assert all(torch.equal(t, again.state_dict()[k]) for k, t in before.items())  # the init is reproducible
    boi, end = processor.boi_token_id, processor.image_token_range[1]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(got[name][:boi], before[name][:boi]), f"{name}: old rows changed"
        assert (got[name][boi:end] != before[name][boi:end]).any(1).all(), f"{name}: a new row did not train"
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(got[q_proj], before[q_proj])
    assert torch.equal(got["model.norm.weight"], before["model.norm.weight"])  # not a LoRA target


def test_sigkill_mid_run_then_relaunch_ends_with_the_same_weights(ddp_run, data_root):
    out = data_root / "killed"
    cmd = command("ddp_cpu.yaml", data_root, out)
    launcher = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    first = out / "checkpoints" / "step-00000003"
    deadline = time.monotonic() + 300
    while not first.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.exists(), "the run never wrote its first checkpoint"
    kill_tree(launcher.pid)
    assert not (out / "final").exists(), "the run finished before the kill: raise STEPS"
    resumed = run(command("ddp_cpu.yaml", data_root, out))  # the same command (on a fresh port)
    log = resumed.stdout + resumed.stderr
    assert "resuming at step" in log
    # Exact: the resumed run continues the data order, RNG and optimizer state bit for bit.
    reference, got = weights(ddp_run[0]), weights(out)
    for name in reference:
        assert torch.equal(got[name], reference[name]), name


@pytest.mark.parametrize("launch,entry", [(None, "script"), ("single.yaml", "module")],
                         ids=["python recipes/finetune.py", "accelerate launch -m unimodal.recipes.finetune"])
def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(data_root, launch, entry):
    out = data_root / f"nan-{entry}"
    proc = subprocess.run(command(launch, data_root, out, "--learning_rate", "1e30", "--warmup_steps", "0",
                                  "--save_steps", "1", entry=entry), env=env(), cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode != 0
    assert re.search(r"NonFiniteLossError: loss is (nan|inf) at step \d+", proc.stderr), proc.stderr[-3000:]
    assert "the last good checkpoint is" in proc.stderr
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved and all(name.startswith("step-") for name in saved)  # complete ones, no .tmp left
    assert not (out / "final").exists()


def test_one_process_lora_adapter_epochs_accumulation_bf16_samples(data_root, text_tokenizer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from unimodal.offline import build_causal_lm
    from unimodal.outputs import load_model

    base = data_root / "base_lm"  # adapters need a base others can load
    build_causal_lm("llama", vocab_size=len(text_tokenizer), hidden_size=32).save_pretrained(base)
    out = data_root / "single"
    cmd = command(None, data_root, out, "--model_name_or_path", str(base), "--max_steps", "0", "--num_epochs", "1",
                  "--packing", "true", "--gradient_accumulation_steps", "2", "--mixed_precision", "bf16",
                  "--gradient_checkpointing", "true", "--mlp_chunk_size", "64",
                  "--use_lora", "true", "--merge_lora", "false", "--eval_steps", "10",
                  "--sample_prompts", "a handwritten digit one", "a handwritten digit two",
                  "--report_to", "tensorboard")
    run(cmd)
    stats = json.loads((out / "train_stats.json").read_text())
    # 2 x 192 training samples (200 digits - 8 held out, t2i + i2t), 2 per packed row of 160 tokens,
    # 4 rows per micro-batch, 2 micro-batches per step: one epoch is 24 optimizer steps.
    assert stats["steps"] == 24 and stats["padding_fraction"] < 0.05
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000010.png", "step-00000020.png",
                                                                  "step-00000024.png"]
    events = EventAccumulator(str(out / "finetune"))  # accelerate's TensorBoard run folder
    events.Reload()
    assert "samples" in events.Tags()["images"]
    assert {"eval/t2i", "eval/i2t", "train/loss", "train/lr"} <= set(events.Tags()["scalars"])
    model = load_model(out / "final")
    processor = UnimodalProcessor.from_pretrained(out / "final")
    assert model.config.vocab_size >= len(processor.tokenizer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP through accelerate needs CUDA")
def test_fsdp_on_gpus(data_root):
    out = data_root / "fsdp"
    cmd = command("fsdp.yaml", data_root, out, "--mixed_precision", "bf16")
    cmd[cmd.index("--config_file"):cmd.index("--config_file")] = ["--num_processes", str(torch.cuda.device_count())]
    run(cmd)
    assert_loadable(out)
