"""UnimodalPipeline: one folder holds LM + tokenizer + processor config + image tokenizer."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from unimodal import PixelTokenizer, PixelTokenizerConfig, UnimodalPipeline
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
