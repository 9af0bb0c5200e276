"""UnimodalPipeline: one folder holds LM + tokenizer + processor config + image tokenizer."""

import dataclasses
import json
import logging
import warnings

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from unimodal import PixelTokenizer, PixelTokenizerConfig, UnimodalPipeline
from unimodal.generation import PRESETS, SamplingConfig, model_sampling
from unimodal.offline import build_causal_lm, train_text_tokenizer


@pytest.fixture
def pipeline(tiny_pipeline_factory):
    """Tied Llama, 16 grey levels, 4x4 images of 16 tokens."""
    return tiny_pipeline_factory(tie=True, image_size=4)


def test_save_load_gives_the_same_images_and_text(pipeline, tmp_path):
    images = pipeline.generate_images(["a cat", "a dog"], num_images_per_prompt=2, seed=3, top_k=8, progress=False)
    text = pipeline.generate_text(["a cat", "the quick"], max_new_tokens=8, temperature=1.0, seed=4)
    pipeline.save_pretrained(tmp_path)

    names = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
            "image_tokenizer/config.json", "image_tokenizer/model.safetensors"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # a standard causal-LM checkpoint
    assert plain.config.vocab_size == pipeline.model.config.vocab_size

    loaded = UnimodalPipeline.from_pretrained(tmp_path)
    again = loaded.generate_images(["a cat", "a dog"], num_images_per_prompt=2, seed=3, top_k=8, progress=False)
    assert [im.tobytes() for im in again] == [im.tobytes() for im in images]
    assert loaded.generate_text(["a cat", "the quick"], max_new_tokens=8, temperature=1.0, seed=4) == text


def test_bf16_load_generates(pipeline, tmp_path):
    pipeline.save_pretrained(tmp_path)
    loaded = UnimodalPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert loaded.model.dtype == torch.bfloat16
    images = loaded.generate_images("a cat", num_images_per_prompt=3, seed=0, progress=False)
    assert len(images) == 3 and images[0].size == (4, 4)
    captions = loaded.generate_text("", images=images[:1], max_new_tokens=4)
    assert isinstance(captions, str)


def test_push_to_hub_uploads_the_whole_folder(pipeline, fake_hub):
    commit = pipeline.push_to_hub("tiny-unimodal", private=True)
    (upload,) = fake_hub.uploads
    assert commit.oid == f"{1:040x}"  # the Hub's commit info is returned
    # a bare name goes to the token owner's namespace, created with the flags given
    assert (upload.repo_id, upload.private, upload.commit_message) == (
        "me/tiny-unimodal", True, "Upload UnimodalPipeline")
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
            "image_tokenizer/model.safetensors"} <= upload.files
    reloaded = UnimodalPipeline.from_pretrained(upload.folder)  # what was uploaded loads and generates alike
    assert reloaded.processor.image_token_range == pipeline.processor.image_token_range
    expected = pipeline.generate_images("a cat", seed=3, top_k=8, progress=False)
    assert reloaded.generate_images("a cat", seed=3, top_k=8, progress=False)[0].tobytes() == expected[0].tobytes()


def test_mismatched_lm_and_processor_are_rejected(pipeline, tiny_pipeline_factory):
    tok = train_text_tokenizer()
    with pytest.raises(ValueError, match="add_image_tokens"):
        UnimodalPipeline(build_causal_lm("llama", vocab_size=len(tok)), pipeline.processor)
    # extended for a bigger codebook: ids differ from the pipeline's processor
    other = tiny_pipeline_factory(text_tokenizer=tok, image_tokenizer=PixelTokenizer(
        PixelTokenizerConfig(codebook_size=27, grayscale=False))).model
    other.config.unimodal["image_token_range"] = [1, 28]
    with pytest.raises(ValueError, match="different checkpoints"):
        UnimodalPipeline(other, pipeline.processor)


def test_generate_recipe_writes_images_grid_and_reproducible_seeds(pipeline, tmp_path, monkeypatch):
    from unimodal.recipes import generate as recipe

    pipeline.save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("a dog\n\nthe quick brown fox\n")
    out = tmp_path / "out"
    record = recipe.main(["--model", str(tmp_path / "model"), "--prompts", "a cat", "--prompts_file",
                          str(tmp_path / "prompts.txt"), "--num_images_per_prompt", "2", "--top_k", "8",
                          "--seed", "10", "--output_dir", str(out)])
    saved = json.loads((out / "generation.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert [(e["prompt"], e["seed"]) for e in saved["images"]] == [
        ("a cat", 10), ("a cat", 11), ("a dog", 12), ("a dog", 13),
        ("the quick brown fox", 14), ("the quick brown fox", 15)]
    assert saved["sampling"] == {"guidance_scale": 7.0, "temperature": 0.9, "top_k": 8, "top_p": 0.99,
                                 "do_sample": True}
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * (4 + 2) + 2, 3 * (4 + 2) + 2)  # one row per prompt
    # The recorded seed reproduces one image alone.
    again = pipeline.generate_images("a dog", seed=13, top_k=8, progress=False)[0]
    assert again.tobytes() == Image.open(out / "images/0003.png").convert("RGB").tobytes()

    captions = recipe.main(["--model", str(tmp_path / "model"), "--mode", "image-to-text", "--images",
                            str(out / "images/0000.png"), str(out / "images/0001.png"), "--max_new_tokens", "5",
                            "--output_dir", str(tmp_path / "captions")])
    assert [t["image"] for t in captions["texts"]] == [str(out / "images/0000.png"), str(out / "images/0001.png")]
    assert all(isinstance(t["text"], str) for t in captions["texts"])
    assert captions["sampling"]["do_sample"] is False
    with pytest.raises(ValueError, match="no prompts"):
        recipe.main(["--model", str(tmp_path / "model"), "--output_dir", str(tmp_path / "x")])


# ---------------------------------------------------------------------------- settings in the folder

REPORT_SETTINGS = SamplingConfig(guidance_scale=3.0, temperature=1.0)  # what the digits report uses


class _Records(logging.Handler):
    """Collects transformers' log records (its logger does not propagate to pytest's caplog)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_sampling_settings_and_control_ids_travel_with_the_folder(pipeline, tmp_path):
    assert pipeline.sampling() == (PRESETS["liquid"], "preset liquid")
    liquid = pipeline.generate_images(["a cat", "a dog"], 2, seed=3, progress=False)
    pipeline.save_pretrained(tmp_path / "none")
    unset = UnimodalPipeline.from_pretrained(tmp_path / "none")
    assert unset.sampling() == (PRESETS["liquid"], "preset liquid")  # a folder without settings: the preset
    assert [im.tobytes() for im in unset.generate_images(["a cat", "a dog"], 2, seed=3, progress=False)] == \
        [im.tobytes() for im in liquid]

    pipeline.set_sampling(REPORT_SETTINGS)
    pipeline.save_pretrained(tmp_path / "own")
    stored = json.loads((tmp_path / "own" / "generation_config.json").read_text())
    assert stored["unimodal_image"] == {"guidance_scale": 3.0, "temperature": 1.0, "top_k": None, "top_p": 1.0,
                                        "do_sample": True}
    loaded = UnimodalPipeline.from_pretrained(tmp_path / "own")
    assert loaded.sampling() == (REPORT_SETTINGS, "model")
    got = loaded.generate_images(["a cat", "a dog"], 2, seed=3, progress=False)
    expected = pipeline.generate_images(["a cat", "a dog"], 2, seed=3, preset=REPORT_SETTINGS, progress=False)
    assert [im.tobytes() for im in got] == [im.tobytes() for im in expected]

    # Generic tools find the ids: transformers alone, no unimodal code, and its generate() is quiet
    # about the extra fields.
    processor = pipeline.processor
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "own")
    ids = {"boi_token_id": processor.boi_token_id, "eoi_token_id": processor.eoi_token_id,
           "pad_token_id": processor.pad_token_id}
    assert {k: getattr(plain.generation_config, k) for k in ids} == ids
    assert {k: getattr(plain.config, k) for k in ids} == ids
    assert plain.generation_config.unimodal_image == stored["unimodal_image"]
    records = _Records()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(records)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = plain.generate(torch.tensor([processor.text_to_image_ids("a cat")]), max_new_tokens=3,
                                 do_sample=False)
    finally:
        hf_logger.removeHandler(records)
    assert out.shape[1] == len(processor.text_to_image_ids("a cat")) + 3
    assert [r.getMessage() for r in records.records] == []


@pytest.mark.parametrize("adapter", [False, True])
def test_save_finetuned_writes_the_settings_for_merged_and_adapter_folders(tmp_path, adapter, tiny_pipeline_factory):
    from unimodal.extend import new_token_ids
    from unimodal.finetune import LoraArguments, apply_lora
    from unimodal.outputs import load_model, save_finetuned
    from unimodal.training import make_accelerator

    pipe = tiny_pipeline_factory(image_size=4, base_dir=tmp_path / "base")  # a base others can load (adapters need one)
    model, processor = pipe.model, pipe.processor
    if adapter:
        model = apply_lora(model, new_token_ids(processor), LoraArguments(use_lora=True, lora_r=4))
    out = save_finetuned(make_accelerator(log_with=None), model, processor, tmp_path / "final", config={},
                         base=str(tmp_path / "base"), merge_lora=not adapter, sampling=REPORT_SETTINGS)
    assert (out / "adapter").is_dir() == adapter
    loaded = load_model(out)  # an adapter's LM is the base's, with the fine-tune's generation config
    assert model_sampling(loaded) == (REPORT_SETTINGS, "model")
    assert (loaded.generation_config.boi_token_id, loaded.generation_config.eoi_token_id) == (
        processor.boi_token_id, processor.eoi_token_id)
    assert UnimodalPipeline.from_pretrained(out).sampling() == (REPORT_SETTINGS, "model")


def test_generate_recipe_starts_from_the_models_settings_and_records_them(pipeline, tmp_path):
    from unimodal.recipes import generate as recipe

    pipeline.save_pretrained(tmp_path / "none")
    pipeline.set_sampling(REPORT_SETTINGS)
    pipeline.save_pretrained(tmp_path / "own")
    common = ["--prompts", "a cat", "--num_images_per_prompt", "2", "--seed", "4"]

    def run(model: str, *extra: str) -> dict:
        out = tmp_path / "out" / f"{model}{len(extra)}"
        recipe.main(["--model", str(tmp_path / model), *common, *extra, "--output_dir", str(out)])
        return json.loads((out / "generation.json").read_text())

    own = run("own")
    assert (own["sampling_source"], own["sampling"]) == ("model", dataclasses.asdict(REPORT_SETTINGS))
    expected = pipeline.generate_images("a cat", 2, seed=4, preset=REPORT_SETTINGS, progress=False)
    produced = [Image.open(tmp_path / "out" / "own0" / e["file"]).convert("RGB") for e in own["images"]]
    assert [im.tobytes() for im in produced] == [im.tobytes() for im in expected]
    overridden = run("own", "--top_p", "0.5")  # a field given overrides the model's
    assert overridden["sampling"] == dataclasses.asdict(dataclasses.replace(REPORT_SETTINGS, top_p=0.5))
    chosen = run("own", "--preset", "liquid")  # --preset wins over the model's
    assert (chosen["sampling_source"], chosen["sampling"]) == ("preset liquid", dataclasses.asdict(PRESETS["liquid"]))
    fallback = run("none")  # a model without settings: the Liquid preset
    assert (fallback["sampling_source"], fallback["sampling"]) == ("preset liquid",
                                                                   dataclasses.asdict(PRESETS["liquid"]))


def test_finetune_recipe_samples_with_and_saves_one_set_of_settings(tmp_path, finetune_data_factory):
    from unimodal.images import make_grid
    from unimodal.recipes import finetune

    data, _ = finetune_data_factory(tmp_path, train_text_tokenizer(), num_digits=40, image_size=4)
    prompts = ["a handwritten digit one", "a handwritten digit two"]
    final = finetune.main([
        "--dataset_path", str(data), "--tokenizer_name_or_path", str(tmp_path / "text_tokenizer"),
        "--tasks", "t2i", "--eval_size", "4", "--max_length", "64", "--per_device_batch_size", "8",
        "--max_steps", "2", "--report_to", "none", "--output_dir", str(tmp_path / "run"),
        "--sample_prompts", *prompts, "--sample_guidance_scale", "2", "--sample_temperature", "0.8",
        "--sample_top_k", "5", "--sample_top_p", "0.9"])
    settings = SamplingConfig(guidance_scale=2.0, temperature=0.8, top_k=5, top_p=0.9)
    pipe = UnimodalPipeline.from_pretrained(final)
    assert pipe.sampling() == (settings, "model")
    # The final step's samples are what the saved model draws by default: one set of settings.
    images = pipe.generate_images(prompts, seed=0, progress=False)
    sampled = Image.open(tmp_path / "run" / "samples" / "step-00000002.png").convert("RGB")
    assert sampled.tobytes() == make_grid(images, ncols=len(images)).convert("RGB").tobytes()
    with pytest.raises(ValueError, match="sample_guidance_scale.*guidance_scale must be >= 1"):
        finetune.main(["--dataset_path", str(data), "--sample_guidance_scale", "0.5"])
