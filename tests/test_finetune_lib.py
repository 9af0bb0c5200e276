"""Fine-tuning parts in-process: LoRA + new token rows, compatibility checks, task data,
held-out evaluation, export (merged, adapter, model card, Hub upload)."""

import json
import logging
import shutil

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from unimodal import UnimodalProcessor
from unimodal.extend import check_compatibility, new_token_ids
from unimodal.finetune import (
    DataArguments,
    LoraArguments,
    ModelArguments,
    apply_lora,
    evaluate,
    frozen_new_rows,
    load_model_and_processor,
    load_task_data,
)
from unimodal.offline import build_causal_lm, train_text_tokenizer
from unimodal.outputs import load_model, save_finetuned
from unimodal.training import make_accelerator


@pytest.fixture
def extended(tiny_pipeline_factory):
    """``extended(arch, tied, codebook_size, image_size)`` -> a tiny extended LM, in training mode
    (GPT-2 has dropout), and its processor."""

    def build(arch="llama", tied=False, codebook_size=16, image_size=4):
        pipe = tiny_pipeline_factory(arch, tie=tied, codebook_size=codebook_size, image_size=image_size)
        return pipe.model.train(), pipe.processor

    return build


def every_new_token(processor):
    """One t2i sample holding <boi>, <eoi> and every image id (a 4x4 grid of the 16 codes)."""
    codes = torch.arange(16).view(4, 4)
    ids = processor.text_to_image_ids("a handwritten digit seven", codes) + [processor.eos_token_id]
    return torch.tensor([ids])


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory, finetune_data_factory):
    root = tmp_path_factory.mktemp("ft_data")
    path, processor = finetune_data_factory(root, train_text_tokenizer(), num_digits=120)
    return path, processor


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("gpt2", True), ("qwen2", False)])
def test_lora_trains_new_rows_only(extended, arch, tied):
    model, processor = extended(arch, tied)
    new = new_token_ids(processor)
    old = slice(0, min(new))
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    peft = apply_lora(model, new, LoraArguments(use_lora=True, lora_r=4))
    assert frozen_new_rows(peft, new) == {}
    ids = every_new_token(processor)
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = peft(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # Before merging: the effective rows (base rows + PEFT's trainable copies of the new ones).
    emb, head = peft.get_input_embeddings().weight, peft.get_output_embeddings().weight
    assert torch.equal(emb[old], emb0[old]) and torch.equal(head[old], head0[old])
    assert (emb[new] != emb0[new]).any(1).all()  # every new row moved
    assert (head[new] != head0[new]).any(1).all()
    peft.eval()  # GPT-2 has dropout
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        merged = peft.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged.get_input_embeddings().weight[old], emb0[old])
    if tied:
        assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("tied", [False, True])
def test_modules_to_save_trains_whole_matrices_tied_head_follows(extended, tied):
    model, processor = extended(tied=tied)
    new = new_token_ids(processor)
    peft = apply_lora(model, new, LoraArguments(use_lora=True, lora_r=4, new_token_rows="modules_to_save"))
    assert frozen_new_rows(peft, new) == {}
    ids = every_new_token(processor)
    head0 = peft.get_output_embeddings().weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        peft(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    merged = peft.merge_and_unload()
    assert (merged.get_output_embeddings().weight[new] != head0[new]).any(1).all()
    if tied:
        torch.testing.assert_close(merged.get_output_embeddings().weight, merged.get_input_embeddings().weight)


@pytest.mark.parametrize("tied", [False, True])
def test_frozen_new_rows_are_named_in_a_warning(extended, tied, caplog):
    model, processor = extended(tied=tied)
    new = new_token_ids(processor)
    with caplog.at_level(logging.WARNING, logger="unimodal.finetune.lora"):
        peft = apply_lora(model, new, LoraArguments(use_lora=True, lora_r=4, new_token_rows="frozen"))
    frozen = frozen_new_rows(peft, new)
    assert frozen["input embedding"] == new
    assert ("lm_head" in frozen) == (not tied)  # a tied head has no rows of its own
    assert f"input embedding: {min(new)}-{max(new)}" in caplog.text
    with pytest.raises(ValueError, match="new_token_rows must be one of"):
        apply_lora(extended()[0], new, LoraArguments(use_lora=True, new_token_rows="some"))


def test_compatibility_errors_say_what_to_do(text_tokenizer, extended, digits_data):
    path, data_processor = digits_data
    data = datasets.load_from_disk(str(path))
    model, processor = extended(image_size=8)
    check_compatibility(model, processor, data)  # the matching pair passes
    plain = build_causal_lm("llama", vocab_size=len(text_tokenizer))
    with pytest.raises(ValueError, match="embedding rows.*add_image_tokens.*codebook_size=16"):
        check_compatibility(plain, processor, data)
    # an LM extended for 16 codes with a processor for 8: codebook size vs added tokens
    _, small = extended(codebook_size=8, image_size=8)
    with pytest.raises(ValueError, match="extended with image_token_range"):
        check_compatibility(model, small, data)
    # image spans of the data vs the grid of the image tokenizer (8x8 data, 4x4 tokenizer)
    model4, processor4 = extended(image_size=4)
    with pytest.raises(ValueError, match="image span of 64 tokens but the image tokenizer makes 16"):
        check_compatibility(model4, processor4, data)
    with pytest.raises(ValueError, match="grid_shape"):  # the data's stored processor signature
        load_task_data(DataArguments(dataset_path=str(path)), processor4)


def test_task_data_mix_holdout_and_errors(digits_data):
    path, processor = digits_data
    args = DataArguments(dataset_path=str(path), tasks=["t2i", "i2t"], task_weights=[2.0, 0.5], eval_size=10)
    train, evals = load_task_data(args, processor, seed=3)
    tasks = train["task"]
    assert tasks.count("t2i") == 2 * 110 and tasks.count("i2t") == 55
    held_out = set(evals["t2i"]["source_index"])
    trained_t2i = set(train.filter(lambda t: t == "t2i", input_columns="task")["source_index"])
    assert len(held_out) == 10 and not held_out & trained_t2i
    assert load_task_data(args, processor, seed=3)[0]["source_index"] == train["source_index"]  # seeded
    with pytest.raises(ValueError, match="task 'interleaved' has no samples.*'i2t', 't2i'"):
        load_task_data(DataArguments(dataset_path=str(path), tasks=["interleaved"]), processor)
    with pytest.raises(ValueError, match="one positive number per task"):
        load_task_data(DataArguments(dataset_path=str(path), tasks=["t2i"], task_weights=[1, 1]), processor)
    with pytest.raises(ValueError, match="not enough to hold out"):
        load_task_data(DataArguments(dataset_path=str(path), eval_size=500), processor)
    # What tokenize_dataset writes when every source image was unreadable.
    empty = path.parent / "empty"
    shutil.copytree(path, empty)
    meta = json.loads((empty / "unimodal_data.json").read_text())
    meta["stats"].update(num_samples=0, num_skipped=120, skipped=["row 0: OSError: truncated"])
    (empty / "unimodal_data.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="holds no samples: 120 of 120 .*row 0: OSError"):
        load_task_data(DataArguments(dataset_path=str(empty)), processor)


def test_evaluate_equals_the_loss_over_all_held_out_tokens(extended, digits_data):
    from unimodal.data import UnimodalCollator, make_dataloader

    path, processor = digits_data
    model, _ = extended(image_size=8)
    _, evals = load_task_data(DataArguments(dataset_path=str(path), tasks=["t2i", "i2t"], eval_size=7), processor)
    accelerator = make_accelerator(log_with=None)
    collator = UnimodalCollator(processor, 128)
    loaders = {t: accelerator.prepare(make_dataloader(d, collator, 3, shuffle=False)) for t, d in evals.items()}
    got = evaluate(accelerator, model, loaders)
    for task, data in evals.items():
        batch = collator([data[i] for i in range(len(data))])  # all samples in one batch
        with torch.no_grad():
            expected = model(**batch).loss.item()  # mean over every target token
        assert got[f"eval/{task}"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("merge", [True, False])
def test_export_one_folder_loads_back(tmp_path, tiny_pipeline_factory, merge, fake_hub):
    from unimodal.hub import push_folder_to_hub

    base_dir = tmp_path / "base"
    pipe = tiny_pipeline_factory(image_size=4, base_dir=base_dir)
    model, processor = pipe.model, pipe.processor
    peft = apply_lora(model, new_token_ids(processor), LoraArguments(use_lora=True, lora_r=4))
    with torch.no_grad():  # stand-in for training: move the adapters and the new rows off their init
        for _name, p in peft.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ids = every_new_token(processor)
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
    accelerator = make_accelerator(log_with=None)
    config = {"learning_rate": 1e-3, "tasks": ["t2i"]}
    out = save_finetuned(accelerator, peft, processor, tmp_path / "final", config=config, base=str(base_dir),
                         merge_lora=merge, metrics={"eval/t2i": 1.25})
    loaded = AutoModelForCausalLM.from_pretrained(out) if merge else load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    reloaded = UnimodalProcessor.from_pretrained(out)
    assert reloaded.image_token_range == processor.image_token_range
    if merge:  # a fine-tuned folder is itself a starting point: no second extension
        again, again_processor = load_model_and_processor(ModelArguments(model_name_or_path=str(out)))
        assert again.config.vocab_size == loaded.config.vocab_size
        assert again_processor.image_token_range == processor.image_token_range
    card = (out / "README.md").read_text()
    assert "learning_rate: 0.001" in card and "| eval/t2i | 1.2500 |" in card
    assert (out / "adapter" / "adapter_model.safetensors").exists() == (not merge)
    assert (out / "model.safetensors").exists() == merge

    push_folder_to_hub(out, "me/digits-lm", private=True, commit_message="fine-tuned digits")
    shutil.rmtree(out)  # what the Hub holds must not depend on the local folder afterwards
    (upload,) = fake_hub.uploads
    assert (upload.repo_id, upload.private, upload.commit_message) == ("me/digits-lm", True, "fine-tuned digits")
    assert {"README.md", "processor_config.json", "image_tokenizer/config.json"} <= upload.files
    assert ("adapter/adapter_model.safetensors" in upload.files) == (not merge)
    assert (upload.folder / "README.md").read_text() == card
    uploaded = AutoModelForCausalLM.from_pretrained(upload.folder) if merge else load_model(upload.folder)
    with torch.no_grad():  # the uploaded folder is the fine-tuned model
        torch.testing.assert_close(uploaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_throughput_counts_after_the_first_step_and_writes_stats(tmp_path):
    from unimodal.training import Throughput

    meter = Throughput()
    meter.tick(100, 128)  # warm-up step: not counted
    meter.tick(90, 100)
    meter.skip()  # e.g. after an evaluation
    meter.tick(10, 28)
    assert (meter.tokens, meter.positions) == (100, 128) and meter.padding_fraction == pytest.approx(28 / 128)
    assert meter.seconds > 0 and meter.tokens_per_s == pytest.approx(100 / meter.seconds)
    assert meter.window_rate() > 0 and meter.window_rate() == 0.0  # the window restarts on each read
    meter.save(tmp_path / "run" / "train_stats.json", steps=3)
    stats = json.loads((tmp_path / "run" / "train_stats.json").read_text())
    assert stats["tokens"] == 100 and stats["steps"] == 3
