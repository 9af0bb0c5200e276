"""Chameleon / Anole as a unified base (`unimodal.bases.chameleon`), on a tiny random
`ChameleonForConditionalGeneration` built in-process: Chameleon's vocabulary layout (``<s> <pad>
</s> <unk>``, then the ``IMGIMG..Z`` image tokens in string order, ``<eoss>``, ``<racm3:break>``,
``<image>``, text) over a small byte-level BPE, a 32-code VQ-GAN of 4x4 = 16 tokens per image."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import ChameleonConfig, ChameleonForConditionalGeneration, PreTrainedTokenizerFast

from unimodal import VQGAN, VQGANConfig
from unimodal.bases import base_for
from unimodal.bases.chameleon import ChameleonUnimodalProcessor, code_to_id_table
from unimodal.bases.chameleon_model import ChameleonImageLM, load_model
from unimodal.generation import SamplingConfig, generate_images, sample_image_tokens
from unimodal.offline import train_text_tokenizer
from unimodal.processor import UnimodalProcessor

K = 32  # codes of the tiny VQ-GAN
LETTERS = "ABCDEFGHIJ"


def image_token(code: int) -> str:
    """Chameleon's spelling of a code: its digits as letters A-J between IMGIMG and Z."""
    return "IMGIMG" + "".join(LETTERS[int(d)] for d in str(code)) + "Z"


def chameleon_tokenizer() -> PreTrainedTokenizerFast:
    """A fast tokenizer in Chameleon's id layout; image tokens are added (non-special) tokens, so
    raw text holding their strings WOULD match them without the processor's guard."""
    text = train_text_tokenizer(vocab_size=300).backend_tokenizer
    text_vocab = json.loads(text.to_str())["model"]
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    images = sorted(image_token(c) for c in range(K))  # string order: not the code order
    controls = ["<eoss>", "<racm3:break>", "<image>", "<reserved08706>"]
    vocab = {t: i for i, t in enumerate(specials + images + controls)}
    for token, _ in sorted(text_vocab["vocab"].items(), key=lambda kv: kv[1]):
        if not token.startswith("<|"):
            vocab[token] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in text_vocab["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", sep_token="<reserved08706>")
    fast.add_tokens(images)  # already in the vocabulary: registered as added tokens, same ids
    fast.add_special_tokens({"additional_special_tokens": ["<eoss>", "<racm3:break>", "<image>"]})
    return fast


def tiny_vqgan(seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig(codebook_size=K, image_size=8, ch=32, ch_mult=[1, 1], num_res_blocks=1,
                             attn_resolutions=[], z_channels=32, embed_dim=8, mid_attention=False,
                             use_l2_norm=False)).eval()  # taming: plain nearest code


def tiny_chameleon(tokenizer, vqgan: VQGAN, seed: int = 0) -> ChameleonForConditionalGeneration:
    """transformers' class, its VQ encoder holding the VQ-GAN's encoder weights."""
    vq = dict(embed_dim=8, num_embeddings=K, latent_channels=32, resolution=8, base_channels=32,
              channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[], attn_type="none")
    config = ChameleonConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             vq_config=vq, vocabulary_map=tokenizer.get_vocab(), bos_token_id=0, pad_token_id=1,
                             eos_token_id=2)
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(config).eval()
    own = {k: v for k, v in vqgan.state_dict().items() if not k.startswith("decoder.")}
    model.model.vqmodel.load_state_dict(own)  # same names: taming's layout
    return model


def write_chameleon_folder(root: Path, seed: int = 0) -> Path:
    """A raw Chameleon checkpoint folder (no processor_config.json), the VQ-GAN in image_tokenizer/."""
    tokenizer, vqgan = chameleon_tokenizer(), tiny_vqgan(seed)
    tiny_chameleon(tokenizer, vqgan, seed).save_pretrained(root)
    tokenizer.save_pretrained(root)
    vqgan.save_pretrained(root / "image_tokenizer")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_chameleon_folder(tmp_path_factory.mktemp("chameleon"))


@pytest.fixture(scope="module")
def processor(folder) -> ChameleonUnimodalProcessor:
    return ChameleonUnimodalProcessor.from_pretrained(folder)


# ----------------------------------------------------------------------------- ids and format

def test_vocabulary_map_is_one_permuted_range(processor, folder):
    table = code_to_id_table(json.loads((folder / "config.json").read_text())["vocabulary_map"])
    assert sorted(table) == list(range(4, 4 + K))  # Chameleon-7b: 4..8195
    assert table != sorted(table)  # IMGIMGBAZ (10) sorts before IMGIMGCZ (2): not the code order
    vocab = processor.vocab
    assert processor.image_token_range == (4, 4 + K) and vocab.permuted
    codes = torch.randint(0, K, (3, 4, 4), generator=torch.Generator().manual_seed(0))
    ids = vocab.codes_to_ids(codes)
    assert torch.equal(vocab.ids_to_codes(ids), codes)
    tok = processor.tokenizer
    assert all(tok.convert_ids_to_tokens(int(i)) == image_token(int(c)) for i, c in zip(ids.flatten(), codes.flatten()))


def test_sequence_format(processor):
    tok = processor.tokenizer
    codes = torch.arange(16).view(4, 4)
    ids = processor.text_to_image_ids("a cat", codes)
    assert tok.convert_ids_to_tokens([ids[0], ids[-2], ids[-1]]) == ["<s>", "<eoss>", "</s>"]
    assert ids[-19] == tok.convert_tokens_to_ids("<racm3:break>") == processor.boi_token_id
    assert processor.text_to_image_ids("a cat")[-1] == processor.boi_token_id
    assert processor.unconditional_prompt_ids() == [0, processor.boi_token_id]
    segments = processor.decode(ids, return_codes=True)
    assert segments[0] == "a cat" and torch.equal(segments[1], codes)


def test_user_text_never_yields_image_or_control_ids(processor):
    text = f"draw {image_token(3)} then {image_token(12)}Z <racm3:break> <eoss> IMGIMG"
    ids = torch.tensor(processor.encode_text(text))
    assert not processor.vocab.is_image(ids).any()
    assert processor.boi_token_id not in ids.tolist() and processor.eoi_token_id not in ids.tolist()
    assert processor.tokenizer.decode(ids.tolist()) == text
    # the guard is what protects: the tokenizer alone matches the image token's string
    raw = processor.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert processor.vocab.is_image(torch.tensor(raw)).any()


def test_processor_save_load_and_dispatch(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["base"] == "chameleon" and len(config["code_to_id"]) == K
    again = UnimodalProcessor.from_pretrained(tmp_path)  # dispatches on "base"
    assert isinstance(again, ChameleonUnimodalProcessor)
    assert torch.equal(again.vocab.code_to_id, processor.vocab.code_to_id)
    assert base_for(tmp_path).name == "chameleon"


def test_vq_codes_equal_the_models_own_vq_encoder(processor, folder):
    model = ChameleonForConditionalGeneration.from_pretrained(folder).eval()
    pixels = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = processor.image_tokenizer.encode(pixels)  # [3, 4, 4] codes
    with torch.no_grad():
        theirs = model.get_image_tokens(pixels)  # [3, 16] ids via img2bpe
    assert torch.equal(processor.vocab.codes_to_ids(ours).flatten(1), theirs.long())


# ----------------------------------------------------------------------------- model and generation

def test_unmasked_forward_and_own_class_reload(folder, tmp_path):
    ours = load_model(str(folder))
    assert isinstance(ours, ChameleonImageLM) and base_for(folder).load_model is load_model
    theirs = ChameleonForConditionalGeneration.from_pretrained(folder).eval()
    ids = torch.tensor([[0, 40, 41, 42, 43]])
    with torch.no_grad():
        a, b = ours.eval()(ids).logits, theirs(ids).logits
    image = slice(4, 4 + K)
    assert (b[..., image] == torch.finfo(b.dtype).min).all()  # transformers masks image logits
    assert torch.isfinite(a[..., image]).all()
    text = torch.ones(a.shape[-1], dtype=torch.bool)
    text[image] = False
    torch.testing.assert_close(a[..., text], b[..., text], rtol=0, atol=0)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
        "ChameleonForConditionalGeneration"]
    reloaded = ChameleonForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, b)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_generation_with_our_class_and_with_transformers_class(folder, processor, static):
    """Same weights, same seed: the masking class (backbone decoder) and ours give the same ids."""
    prompts = [processor.text_to_image_ids("a cat"), processor.text_to_image_ids("two dogs")]
    sampling = SamplingConfig(guidance_scale=3.0, temperature=1.0, top_k=8)
    ours = load_model(str(folder)).eval()
    a = sample_image_tokens(ours, processor, prompts, sampling, seed=0, progress=False, static_cache=static)
    assert a.shape == (2, 16) and processor.vocab.is_image(a).all()
    theirs = ChameleonForConditionalGeneration.from_pretrained(folder).eval()
    if static:
        with pytest.raises(ValueError, match="drop static_cache"):
            sample_image_tokens(theirs, processor, prompts, sampling, seed=0, progress=False, static_cache=True)
        return
    b = sample_image_tokens(theirs, processor, prompts, sampling, seed=0, progress=False)
    assert torch.equal(a, b)
    images = generate_images(ours, processor, ["a cat"], seed=0, guidance_scale=2.0, progress=False)
    assert images[0].size == (8, 8)


def test_jacobi_decoding_matches_token_by_token_when_greedy(folder, processor):
    prompts = [processor.text_to_image_ids("a cat"), processor.text_to_image_ids("two dogs")]
    greedy = SamplingConfig(guidance_scale=3.0, do_sample=False)
    ours = load_model(str(folder)).eval()
    token = sample_image_tokens(ours, processor, prompts, greedy, progress=False)
    theirs = ChameleonForConditionalGeneration.from_pretrained(folder).eval()
    for model in (ours, theirs):
        jacobi = sample_image_tokens(model, processor, prompts, greedy, progress=False, decoding="jacobi", window=4)
        assert torch.equal(jacobi, token)


def test_one_step_lowers_the_loss_chunked_equals_own(folder, processor):
    from unimodal.training.loss import batch_loss

    model = load_model(str(folder)).train()
    codes = torch.randint(0, K, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    rows = [processor.text_to_image_ids("a cat", codes[0]), processor.text_to_image_ids("two dogs", codes[1])]
    batch = dict(processor.pad(rows))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    chunked = batch_loss(model, batch, "chunked")
    own = batch_loss(model, batch, "model")
    torch.testing.assert_close(chunked, own, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(own) and own < 20  # the masked class would give ~3e38 on image targets
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    chunked.backward()
    assert all(p.grad is None for p in model.model.vqmodel.parameters())  # the VQ stays frozen
    optimizer.step()
    assert batch_loss(model, batch, "chunked") < chunked


def test_image_head_rows_mode_trains_only_those_rows(folder):
    from unimodal.bases.chameleon_model import apply_lora
    from unimodal.finetune import LoraArguments

    model = load_model(str(folder))
    head_before = model.lm_head.weight.detach().clone()
    embed_before = model.get_input_embeddings().weight.detach().clone()
    peft_model = apply_lora(model, LoraArguments(use_lora=True, trainable_parts="image_head_rows"))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lm_head" in n for n in trainable)
    ids = torch.tensor([[0, 40, 41, 5, 6, 7]])
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0).step()
    merged = peft_model.merge_and_unload()
    changed = (merged.lm_head.weight != head_before).any(1).nonzero().flatten().tolist()
    assert changed and set(changed) <= set(range(4, 4 + K))
    assert torch.equal(merged.get_input_embeddings().weight, embed_before)


# ----------------------------------------------------------------------------- recipes end to end

@pytest.fixture(scope="module")
def data(tmp_path_factory, folder) -> Path:
    """24 digits tokenised by the recipe from the raw Chameleon folder (t2i + i2t)."""
    from digits import load_digits_dataset  # examples/digits/digits.py, on pytest's pythonpath

    from unimodal.recipes import tokenize_dataset

    root = tmp_path_factory.mktemp("chameleon_data")
    load_digits_dataset(image_size=8, split="train").select(range(24)).save_to_disk(str(root / "source"))
    tokenize_dataset.main(["--source", str(root / "source"), "--model_name_or_path", str(folder),
                           "--tasks", "t2i", "i2t", "--output_dir", str(root / "data"),
                           "--cache_dir", str(root / "cache")])
    return root / "data"


def finetune_args(folder: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(folder), "--dataset_path", str(data), "--tasks", "t2i", "i2t",
            "--eval_size", "4", "--max_length", "64", "--per_device_batch_size", "4", "--max_steps", "3",
            "--learning_rate", "3e-3", "--warmup_steps", "0", "--mixed_precision", "no", "--report_to", "none",
            "--output_dir", str(out), *extra]


def test_tokenize_finetune_save_reload_generate(folder, data, tmp_path):
    from unimodal import UnimodalPipeline
    from unimodal.data import PROCESSOR_SUBFOLDER
    from unimodal.recipes import finetune

    assert isinstance(UnimodalProcessor.from_pretrained(data / PROCESSOR_SUBFOLDER), ChameleonUnimodalProcessor)
    final = finetune.main(finetune_args(folder, data, tmp_path / "run"))
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["ChameleonForConditionalGeneration"]
    assert json.loads((final / "processor_config.json").read_text())["base"] == "chameleon"
    assert "ChameleonForConditionalGeneration.from_pretrained" in (final / "README.md").read_text()
    theirs = ChameleonForConditionalGeneration.from_pretrained(final).eval()
    pipe = UnimodalPipeline.from_pretrained(final)
    assert isinstance(pipe.model, ChameleonImageLM)
    ids = torch.tensor([pipe.processor.text_to_image_ids("a handwritten digit three")])
    with torch.no_grad():
        ours, own = pipe.model(ids).logits, theirs(ids).logits
    text = torch.ones(own.shape[-1], dtype=torch.bool)
    text[4:4 + K] = False
    assert torch.equal(ours[..., text], own[..., text])  # same weights; only the image mask differs
    images = pipe.generate_images(["a handwritten digit three"], 2, seed=0, progress=False)
    assert len(images) == 2 and images[0].size == (8, 8)
    # the raw base folder opens the same way (its processor built from the model folder)
    assert UnimodalPipeline.from_pretrained(folder).generate_images("a cat", seed=0, progress=False)


def test_lora_and_image_head_rows_recipes(folder, data, tmp_path):
    from unimodal.recipes import finetune

    before = ChameleonForConditionalGeneration.from_pretrained(folder).state_dict()
    final = finetune.main(finetune_args(folder, data, tmp_path / "rows", "--use_lora", "true",
                                        "--trainable_parts", "image_head_rows"))
    after = ChameleonForConditionalGeneration.from_pretrained(final).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"lm_head.weight"}
    rows = (before["lm_head.weight"] != after["lm_head.weight"]).any(1).nonzero().flatten().tolist()
    assert rows and set(rows) <= set(range(4, 4 + K))
    final = finetune.main(finetune_args(folder, data, tmp_path / "lora", "--use_lora", "true",
                                        "--merge_lora", "false"))
    from unimodal import UnimodalPipeline

    pipe = UnimodalPipeline.from_pretrained(final)  # base + adapter, merged
    assert isinstance(pipe.model, ChameleonImageLM)
    assert pipe.generate_images("a cat", seed=0, progress=False)[0].size == (8, 8)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2.yaml", "zero3.yaml"])
def test_deepspeed_two_processes(folder, data, tmp_path, config):
    """DeepSpeed ZeRO-2 / ZeRO-3 over gloo, 2 CPU processes (slow: two launches of DeepSpeed, ~1 min
    each); under ZeRO-3 the final save gathers the sharded weights into Chameleon's own format."""
    from launching import LAUNCH_CONFIGS, free_port, run

    out = tmp_path / config.removesuffix(".yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH_CONFIGS / config),
           "--main_process_port", str(free_port()), "-m", "unimodal.recipes.finetune",
           *finetune_args(folder, data, out, "--eval_steps", "3")]
    proc = run(cmd)
    assert "step 3: eval/t2i" in proc.stdout + proc.stderr
    model = ChameleonForConditionalGeneration.from_pretrained(out / "final")
    start = ChameleonForConditionalGeneration.from_pretrained(folder)
    assert not torch.equal(model.lm_head.weight, start.lm_head.weight)
    # every weight saved whole: 3 steps at lr 3e-3 move a weight by ~0.01 at most, a missing (or
    # empty, un-gathered ZeRO-3) one would be re-initialised at random by from_pretrained
    ours, theirs = model.state_dict(), start.state_dict()
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 0.05


# ----------------------------------------------------------------------------- resume and NaN stop
RESUME_STEPS = 40  # a tiny step takes ~10 ms: room after the step-3 checkpoint for the signal to land mid-run


@contextmanager
def sigterm_when(path: Path) -> Iterator[list[int]]:
    """Send SIGTERM to this process once ``path`` exists, for the recipe's preemption handler (it
    checkpoints at the end of the current step and raises `Preempted`). A signal that comes after
    the recipe put the handlers back lands in the returned list instead of killing pytest."""
    late: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: late.append(number))
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and not path.exists():
            time.sleep(0.002)
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield late
    finally:
        done.set()
        watcher.join()
        signal.signal(signal.SIGTERM, previous)


def test_preempted_finetune_resumes_bit_identical(folder, data, tmp_path, capsys):
    """A Chameleon fine-tune stopped by SIGTERM after its step-3 checkpoint, relaunched with the same
    command, ends with the weights of the uninterrupted run, bit for bit (in-process; the launched
    text-LM variants are tests/test_faults*.py)."""
    from launching import weights
    from test_faults import assert_same_weights

    from unimodal.recipes import finetune
    from unimodal.training import PREEMPTED_EXIT_CODE, Preempted

    def args(out: Path) -> list[str]:
        return finetune_args(folder, data, out, "--max_steps", str(RESUME_STEPS), "--save_steps", "3",
                             "--eval_steps", "0")

    finetune.main(args(tmp_path / "reference"))
    out = tmp_path / "preempted"
    with sigterm_when(out / "checkpoints" / "step-00000003") as late, pytest.raises(Preempted) as stopped:
        finetune.main(args(out))
    assert not late and stopped.value.code == PREEMPTED_EXIT_CODE and not (out / "final").exists()
    match = re.search(r"preempted \(SIGTERM\) at step (\d+): ", stopped.value.message)
    assert match and 3 <= int(match.group(1)) < RESUME_STEPS, stopped.value.message
    capsys.readouterr()
    finetune.main(args(out))
    captured = capsys.readouterr()
    assert f"resuming at step {match.group(1)}" in captured.out + captured.err
    assert_same_weights(out, weights(tmp_path / "reference"))


def test_nan_loss_stops_with_the_message_and_a_checkpoint(folder, data, tmp_path):
    """A diverging Chameleon fine-tune (learning rate 1e30) stops with the recipe's message naming
    the last good checkpoint; only complete checkpoints are left and no final model."""
    from test_faults import checkpoint_names

    from unimodal.recipes import finetune
    from unimodal.training import NonFiniteLossError

    out = tmp_path / "nan"
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step \d+; stopping \(the last good "
                                                 r"checkpoint is .*step-\d+\)"):
        finetune.main(finetune_args(folder, data, out, "--learning_rate", "1e30", "--save_steps", "1",
                                    "--max_steps", "10"))
    # the recipe's preemption handlers are gone with it, although it raised
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == handlers
    saved = checkpoint_names(out)
    assert saved and all(name.startswith("step-") for name in saved)  # complete ones, no .tmp left
    assert not (out / "final").exists()


def test_web_demo_and_generate_recipe_take_the_raw_folder(folder, tmp_path):
    from unimodal.recipes import generate
    from unimodal.webdemo import DemoHandlers, load_pipeline

    handlers = DemoHandlers(load_pipeline(str(folder), device="cpu"))
    gallery = handlers.text_to_image("a cat", 2, 2.0, 1.0, 8, 1.0, 0)
    assert [label for _, label in gallery] == ["seed 0", "seed 1"] and gallery[0][0].size == (8, 8)
    caption = handlers.image_to_text(gallery[0][0], "", 4, 1.0, 1.0, 0)
    assert isinstance(caption, str)
    record = generate.main(["--model", str(folder), "--prompts", "a cat", "--output_dir", str(tmp_path / "out"),
                            "--seed", "0"])
    assert record["images"]
