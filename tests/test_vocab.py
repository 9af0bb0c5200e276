"""add_image_tokens + ImageVocabulary: every tiny architecture, tied and untied heads, is extended,
trains a step, and saves/reloads with identical logits."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from unimodal import ImageVocabulary, UnimodalProcessor, add_image_tokens
from unimodal.images import tensor_to_pil
from unimodal.offline import TINY_ARCHITECTURES, build_causal_lm


@pytest.fixture
def tokenizer(text_tokenizer):
    # A fresh one per test: add_image_tokens extends it in place.
    return text_tokenizer


def _batch(processor, pixel_tokenizer):
    codes = torch.randint(0, pixel_tokenizer.codebook_size, (2, *pixel_tokenizer.grid_shape),
                          generator=torch.Generator().manual_seed(0))
    images = tensor_to_pil(pixel_tokenizer.decode(codes))
    batch = processor(["a handwritten digit <image>", "<image> describe the image"], images=images,
                      add_eos=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch, labels


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("model_type", list(TINY_ARCHITECTURES))
def test_extend_train_save_reload(model_type, tied, tokenizer, pixel_tokenizer, tmp_path):
    model = build_causal_lm(model_type, vocab_size=len(tokenizer), tie_word_embeddings=tied)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    n_text = len(tokenizer)

    processor = add_image_tokens(model, tokenizer, pixel_tokenizer)

    # layout: <boi>, <eoi>, then 16 image ids, all new; rows padded to a multiple of 64
    assert (processor.boi_token_id, processor.eoi_token_id) == (n_text, n_text + 1)
    assert processor.image_token_range == (n_text + 2, n_text + 2 + 16) and len(tokenizer) == n_text + 18
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == model.config.vocab_size == model.get_output_embeddings().weight.shape[0]
    assert rows % 64 == 0 and len(tokenizer) <= rows < len(tokenizer) + 64
    assert model.config.unimodal["image_token_range"] == list(processor.image_token_range)
    # tied heads share storage, untied ones do not
    same = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert same == tied
    # old rows kept, new rows at the mean of the old rows (input and output side)
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    for old, new in ((old_in, new_in), (old_out, new_out)):
        assert torch.equal(new[:n_text], old)
        expected = old.mean(0).expand(rows - n_text, -1)
        torch.testing.assert_close(new[n_text:].detach(), expected, atol=1e-5, rtol=0)

    # one optimizer step on an interleaved text+image batch lowers the loss on that batch
    batch, labels = _batch(processor, pixel_tokenizer)
    assert processor.vocab.is_image(batch["input_ids"]).sum() == 2 * processor.num_image_tokens
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model(**batch, labels=labels).loss
    before.backward()
    optimizer.step()
    optimizer.zero_grad()
    image_rows = slice(*processor.image_token_range)
    assert not torch.equal(model.get_input_embeddings().weight[image_rows], old_in.mean(0).expand(16, -1))
    with torch.no_grad():
        after = model(**batch, labels=labels).loss
    assert after < before

    # a saved folder (LM + processor) loads back with standard classes and gives identical logits
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded_processor = UnimodalProcessor.from_pretrained(tmp_path)
    assert reloaded.config.vocab_size == rows and reloaded.config.unimodal == model.config.unimodal
    batch_again, _ = _batch(reloaded_processor, pixel_tokenizer)
    assert torch.equal(batch_again["input_ids"], batch["input_ids"])
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch_again).logits, model(**batch).logits)


def test_padded_vocab_keeps_existing_rows(tokenizer, pixel_tokenizer):
    # the LM has 600 rows for a smaller tokenizer (like Qwen's padded vocab)
    n_text = len(tokenizer)
    assert n_text < 600
    model = build_causal_lm("qwen2", vocab_size=600)
    old = model.get_input_embeddings().weight.detach().clone()
    processor = add_image_tokens(model, tokenizer, pixel_tokenizer)
    # fillers take ids n_text..599, so control and image ids land on brand-new rows
    assert tokenizer.convert_ids_to_tokens([n_text, 599]) == [
        "<|unimodal_reserved_0|>", f"<|unimodal_reserved_{599 - n_text}|>"]
    assert processor.boi_token_id == 600 and processor.image_token_range == (602, 618)
    assert processor.image_token_range[1] == len(tokenizer)
    new = model.get_input_embeddings().weight.detach()
    assert new.shape[0] == model.config.vocab_size == 640
    assert torch.equal(new[:600], old)
    torch.testing.assert_close(new[600:], old.mean(0).expand(40, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_codebook_init_carries_code_geometry(tied, tokenizer):
    from unimodal import VQGAN, VQGANConfig

    vq = VQGAN(VQGANConfig(codebook_size=32, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=8,
                           num_groups=4, embed_dim=4, image_size=8, use_l2_norm=True))
    model = build_causal_lm("llama", vocab_size=len(tokenizer), tie_word_embeddings=tied)
    n_text = len(tokenizer)

    def weights():  # the input embedding and, if untied, the head (resizing replaces them)
        pair = (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
        return list({id(w): w.detach() for w in pair}.values())

    before = [w[:n_text].clone() for w in weights()]
    processor = add_image_tokens(model, tokenizer, vq, image_rows_init="codebook")
    lo, hi = processor.image_token_range
    codes = vq.code_vectors() - vq.code_vectors().mean(0)  # [32, 4]
    off = ~torch.eye(32, dtype=torch.bool)

    def cosines(x):  # [K, D] -> the K*(K-1) pairwise cosine similarities
        x = torch.nn.functional.normalize(x, dim=1)
        return (x @ x.T)[off]

    assert len(weights()) == (1 if tied else 2)
    for old, new in zip(before, weights()):
        assert torch.equal(new[:n_text], old)  # text rows untouched
        rows = new[lo:hi]  # [32, H]
        # the spread of the text rows around their mean, and the codebook's geometry: codes that
        # are close in the codebook are close in the LM
        assert rows.std().item() == pytest.approx(old.std().item(), rel=0.3)
        torch.testing.assert_close(rows.mean(0), old.mean(0), atol=3 * old.std().item() / 32 ** 0.5, rtol=0)
        assert torch.corrcoef(torch.stack([cosines(codes), cosines(rows - rows.mean(0))]))[0, 1] > 0.8
    with pytest.raises(ValueError, match="image_rows_init"):
        add_image_tokens(build_causal_lm("llama", vocab_size=n_text), copy.deepcopy(tokenizer), vq,
                         image_rows_init="random")


def test_weightless_meta_model_gives_the_same_layout(tokenizer, pixel_tokenizer):
    # recipes learn the id layout from an LM built on the meta device (no weights loaded)
    config = build_causal_lm("qwen2", vocab_size=600).config
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    real = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    from_meta = add_image_tokens(meta, copy.deepcopy(tokenizer), pixel_tokenizer)
    from_real = add_image_tokens(real, tokenizer, pixel_tokenizer)
    assert meta.config.vocab_size == real.config.vocab_size == 640
    for attr in ("boi_token_id", "eoi_token_id", "pad_token_id", "image_token_range"):
        assert getattr(from_meta, attr) == getattr(from_real, attr)


def test_tokenizer_without_pad_token_gets_one(pixel_tokenizer):
    from transformers import LlamaTokenizer

    from unimodal.offline import SAMPLE_TEXT

    tokenizer = LlamaTokenizer().train_new_from_iterator(SAMPLE_TEXT, vocab_size=300)
    assert tokenizer.pad_token_id is None
    model = build_causal_lm("llama", vocab_size=len(tokenizer))
    processor = add_image_tokens(model, tokenizer, pixel_tokenizer, pad_to_multiple_of=None)
    assert tokenizer.pad_token == "<pad>" and processor.pad_token_id == model.config.pad_token_id
    assert processor.pad_token_id not in (processor.eos_token_id, processor.bos_token_id)
    assert model.config.vocab_size == len(tokenizer)  # no rounding asked for


def test_second_extension_or_clashing_token_is_refused(tokenizer, pixel_tokenizer, tiny_pipeline_factory):
    fresh = copy.deepcopy(tokenizer)
    model = tiny_pipeline_factory(text_tokenizer=tokenizer, image_tokenizer=pixel_tokenizer).model
    with pytest.raises(ValueError, match="already has a token '<boi>'"):
        add_image_tokens(model, tokenizer, pixel_tokenizer)
    # a control string that is an ordinary text token would let text produce it
    with pytest.raises(ValueError, match="already has a token 'the'"):
        add_image_tokens(build_causal_lm("llama", vocab_size=len(fresh)), fresh, pixel_tokenizer,
                         boi_token="the", eoi_token="<eoi2>", image_token_template="<c{}>")


def test_vocabulary_mapping_round_trip_and_errors():
    vocab = ImageVocabulary(offset=1000, codebook_size=8192)
    codes = torch.randint(0, 8192, (4, 16, 16))
    ids = vocab.codes_to_ids(codes)
    assert ids.shape == codes.shape and ids.min() >= 1000 and ids.max() < 1000 + 8192
    assert torch.equal(vocab.ids_to_codes(ids), codes)
    assert vocab.is_image(torch.tensor([999, 1000, 9191, 9192])).tolist() == [False, True, True, False]
    mixed = ids.clone()
    mixed[2, 3, 4] = 5
    with pytest.raises(ValueError, match=r"id 5 at position \(2, 3, 4\) is not an image token"):
        vocab.ids_to_codes(mixed)
    with pytest.raises(ValueError, match="code 8192 at position 1"):
        vocab.codes_to_ids(torch.tensor([0, 8192]))
    with pytest.raises(ValueError, match="integer"):
        vocab.codes_to_ids(torch.zeros(3))


# ----------------------------------------------------------------------------- permuted id tables

def test_permuted_vocabulary_round_trips_and_keeps_range_test():
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0)) + 100  # code c -> id perm[c]
    vocab = ImageVocabulary.from_ids(perm)
    assert (vocab.offset, vocab.end, vocab.codebook_size) == (100, 164, 64) and vocab.permuted
    codes = torch.randint(0, 64, (3, 4, 5), generator=torch.Generator().manual_seed(1))
    ids = vocab.codes_to_ids(codes)
    assert ids.shape == codes.shape and torch.equal(ids, perm[codes])
    assert torch.equal(vocab.ids_to_codes(ids), codes)
    assert torch.equal(vocab.ids_to_codes(torch.arange(100, 164)), torch.argsort(perm))
    assert vocab.is_image(torch.tensor([99, 100, 163, 164])).tolist() == [False, True, True, False]
    with pytest.raises(ValueError, match="outside"):
        vocab.codes_to_ids(torch.tensor([64]))
    with pytest.raises(ValueError, match="not an image token"):
        vocab.ids_to_codes(torch.tensor([99]))


def test_identity_table_is_the_plain_offset_vocabulary():
    vocab = ImageVocabulary.from_ids(torch.arange(10, 20))
    assert not vocab.permuted and vocab == ImageVocabulary(10, 10)
    assert torch.equal(vocab.codes_to_ids(torch.tensor([0, 9])), torch.tensor([10, 19]))


def test_ids_with_holes_are_refused():
    with pytest.raises(ValueError, match="not one contiguous range"):
        ImageVocabulary.from_ids([5, 6, 8])
    with pytest.raises(ValueError, match="not one contiguous range"):
        ImageVocabulary.from_ids([5, 6, 6])
    with pytest.raises(ValueError, match="not a permutation"):
        ImageVocabulary(0, 3, torch.tensor([0, 1, 5]))
