import pytest
import torch

from unimodal import PixelTokenizer, PixelTokenizerConfig
from unimodal.images import pil_to_tensor, tensor_to_pil


def test_round_trip_of_palette_colours_is_exact(pixel_tokenizer):
    codes = torch.randint(0, 16, (2, 8, 8))
    pixels = pixel_tokenizer.decode(codes)
    assert pixels.shape == (2, 3, 8, 8)
    assert torch.equal(pixel_tokenizer.encode(pixels), codes)


def test_pixel_size_downsamples_and_upsamples():
    tok = PixelTokenizer(PixelTokenizerConfig(codebook_size=8, image_size=16, pixel_size=4))
    assert tok.grid_shape == (4, 4) and tok.num_image_tokens == 16
    codes = tok.encode(torch.rand(3, 3, 16, 16) * 2 - 1)
    assert codes.shape == (3, 4, 4)
    assert tok.decode(codes).shape == (3, 3, 16, 16)


def test_fit_palette_reduces_error():
    torch.manual_seed(0)
    # colours clustered around 4 centres
    centres = torch.tensor([[-0.9, 0.2, 0.5], [0.3, -0.7, 0.1], [0.8, 0.8, -0.5], [0.0, 0.0, 0.9]])
    idx = torch.randint(0, 4, (64, 8, 8))
    pixels = (centres[idx] + 0.02 * torch.randn(64, 8, 8, 3)).permute(0, 3, 1, 2)
    tok = PixelTokenizer(PixelTokenizerConfig(codebook_size=4, image_size=8, grayscale=True))
    before = (tok.decode(tok.encode(pixels)) - pixels).abs().mean()
    tok.fit_palette(pixels)
    after = (tok.decode(tok.encode(pixels)) - pixels).abs().mean()
    assert after < 0.05 < before


def test_save_load_round_trip(tmp_path, pixel_tokenizer):
    from transformers import AutoModel

    pixel_tokenizer.fit_palette(torch.rand(4, 3, 8, 8) * 2 - 1)
    pixel_tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, PixelTokenizer)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(loaded.encode(x), pixel_tokenizer.encode(x))


def test_bad_inputs_raise_clear_errors(pixel_tokenizer):
    with pytest.raises(ValueError, match="outside"):
        pixel_tokenizer.decode(torch.full((1, 8, 8), 16))
    tok = PixelTokenizer(PixelTokenizerConfig(codebook_size=16, image_size=8, pixel_size=4))
    with pytest.raises(ValueError, match="divisible"):
        tok.encode(torch.zeros(1, 3, 10, 10))


def test_pil_round_trip(pixel_tokenizer):
    codes = torch.randint(0, 16, (2, 8, 8))
    images = tensor_to_pil(pixel_tokenizer.decode(codes))
    assert torch.equal(pixel_tokenizer.encode(pil_to_tensor(images)), codes)
