"""VQGAN: shapes, round trips, saving/loading/pushing, training (parity with diffusers' VQModel and
other references: tests/test_convert.py)."""

import pytest
import torch
from transformers import AutoModel

from unimodal import VQGAN, PixelTokenizer, PixelTokenizerConfig, VQGANConfig, VQGANOutput
from unimodal.vq import load_image_tokenizer
from unimodal.vq.losses import VQGANLoss, VQGANLossConfig


def tiny_config(**overrides) -> VQGANConfig:
    kw = dict(
        codebook_size=32, image_size=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
        z_channels=8, embed_dim=4, num_groups=8, use_l2_norm=False,
    )
    return VQGANConfig(**{**kw, **overrides})


def pixels(b=2, size=16, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def vq():
    torch.manual_seed(0)
    return VQGAN(tiny_config()).eval()


def test_shapes_grid_and_taming_key_names(vq):
    assert vq.downsample_factor == 2 and vq.grid_shape == (8, 8) and vq.num_image_tokens == 64
    out = vq(pixels())
    assert isinstance(out, VQGANOutput)
    assert out.reconstruction.shape == (2, 3, 16, 16) and out.codes.shape == (2, 8, 8)
    assert out.latents.shape == out.quantized.shape == (2, 4, 8, 8)
    for name in ("quant_loss", "codebook_loss", "commitment_loss", "perplexity", "usage"):
        assert out[name].shape == () and out[name].dtype == torch.float32
    keys = set(vq.state_dict())
    for key in (
        "encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.attn.0.q.weight", "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.mid.block_1.norm1.weight", "encoder.mid.attn_1.proj_out.weight", "encoder.norm_out.weight",
        "quant_conv.weight", "quantize.embedding.weight", "post_quant_conv.weight",
        "decoder.up.1.upsample.conv.weight", "decoder.up.0.block.1.conv2.weight", "decoder.conv_out.weight",
    ):
        assert key in keys, key
    # three levels: f = 4, and inputs of another multiple of f work too
    deep = VQGAN(tiny_config(ch_mult=(1, 2, 2), attn_resolutions=()))
    assert deep.encode(pixels(size=24)).shape == (2, 6, 6)
    assert deep.decode(torch.zeros(1, 5, 3, dtype=torch.long)).shape == (1, 3, 20, 12)


def test_decode_of_encode_equals_decoding_the_quantised_latents(vq):
    x = pixels()
    codes = vq.encode(x)
    with torch.no_grad():
        expected = vq.decode_latents(vq.quantize(vq.encode_latents(x)).quantized)
        from_forward = vq(x).reconstruction
    torch.testing.assert_close(vq.decode(codes), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_forward, expected, rtol=1e-5, atol=1e-5)


def test_straight_through_gradients_reach_the_encoder_not_the_codebook(vq):
    vq.train()
    out = vq(pixels())
    out.reconstruction.pow(2).mean().backward()  # a pixel loss only
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vq.quant_conv.weight.grad.abs().sum() > 0
    assert vq.quantize.embedding.weight.grad is None  # only the codebook loss trains the codes


def test_save_load_and_automodel_round_trip_give_identical_codes(tmp_path):
    torch.manual_seed(0)
    vq = VQGAN(tiny_config(ema_decay=0.9, kmeans_init=True)).train()
    vq(pixels(b=4))  # k-means init + one EMA step, so the buffers differ from a fresh model
    vq.eval()
    vq.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is VQGAN and not loaded.training
    for key, value in vq.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = pixels(b=3, seed=5)
    assert torch.equal(loaded.encode(x), vq.encode(x))
    assert isinstance(load_image_tokenizer(tmp_path), VQGAN)
    # bf16 load: the convs go bf16, the codebook stays fp32
    half = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.encoder.conv_in.weight.dtype == torch.bfloat16
    assert half.quantize.embedding.weight.dtype == torch.float32
    assert half.decode(half.encode(x)).shape == (3, 3, 16, 16)


def test_load_image_tokenizer_accepts_tokenizers_and_rejects_lms(tmp_path, text_tokenizer):
    from unimodal.offline import build_causal_lm

    PixelTokenizer(PixelTokenizerConfig()).save_pretrained(tmp_path / "pixel")
    assert isinstance(load_image_tokenizer(tmp_path / "pixel"), PixelTokenizer)
    build_causal_lm("llama", vocab_size=len(text_tokenizer)).save_pretrained(tmp_path / "lm")
    with pytest.raises(TypeError, match="not an image tokenizer"):
        load_image_tokenizer(tmp_path / "lm")


def test_push_to_hub_uploads_config_and_safetensors(vq, fake_hub):
    vq.push_to_hub("someone/tiny-vqgan", private=True)  # transformers' push_to_hub: one create_commit
    (upload,) = fake_hub.uploads
    assert (upload.repo_id, upload.private, upload.commit_message) == ("someone/tiny-vqgan", True, "Upload VQGAN")
    assert {"config.json", "model.safetensors"} <= upload.files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in upload.files)
    x = pixels()  # what went up loads back to the same tokenizer
    assert torch.equal(load_image_tokenizer(upload.folder).encode(x), vq.encode(x))


def test_decode_rejects_codes_outside_the_codebook(vq):
    with pytest.raises(ValueError, match=r"outside \[0, 32\)"):
        vq.decode(torch.full((1, 8, 8), 32))
    with pytest.raises(ValueError, match="outside"):
        vq.decode(torch.full((1, 8, 8), -1))
    with pytest.raises(ValueError, match="integer"):
        vq.decode(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        vq.encode(torch.zeros(1, 3, 15, 15))


def test_config_errors_say_what_to_do():
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny_config(ch_mult=(1, 2, 2), image_size=18)
    with pytest.raises(ValueError, match="num_groups=32 must divide"):
        tiny_config(num_groups=32)
    with pytest.raises(ValueError, match="ema_decay"):
        tiny_config(ema_decay=1.5)


def test_bf16_autocast_training_step_keeps_quantizer_losses_fp32(vq):
    vq.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(pixels())
    assert out.latents.dtype == torch.bfloat16
    assert out.quant_loss.dtype == out.commitment_loss.dtype == torch.float32
    assert torch.equal(out.codes, vq.quantize.lookup(out.latents.float()))
    (out.reconstruction.float().pow(2).mean() + out.quant_loss).backward()
    assert vq.quantize.embedding.weight.grad.dtype == torch.float32


def _image_crops(n: int, size: int = 16) -> torch.Tensor:
    """``n`` random ``size``-pixel crops of scikit-learn's sample photos, in [-1, 1]."""
    from sklearn.datasets import load_sample_images

    photos = [torch.tensor(im).permute(2, 0, 1).float() / 127.5 - 1 for im in load_sample_images().images]
    g = torch.Generator().manual_seed(0)
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]
        y = int(torch.randint(0, photo.shape[1] - size * 4, (1,), generator=g))
        x = int(torch.randint(0, photo.shape[2] - size * 4, (1,), generator=g))
        # 4x box-downsampled so a crop holds some structure, not a flat patch
        crops.append(torch.nn.functional.avg_pool2d(photo[:, y : y + size * 4, x : x + size * 4], 4))
    return torch.stack(crops)


def test_short_training_loop_reduces_reconstruction_loss():
    torch.manual_seed(0)
    vq = VQGAN(tiny_config(dead_code_threshold=1, usage_window=4, use_l2_norm=True)).train()
    loss_fn = VQGANLoss(VQGANLossConfig(disc_start=12, disc_layers=1, disc_channels=16)).train()
    opt_g = torch.optim.Adam(vq.parameters(), lr=3e-3)
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=1e-3)
    data = _image_crops(64)
    before = [p.detach().clone() for p in loss_fn.discriminator.parameters()]
    rec = []
    for step in range(25):
        x = data[(step * 8) % 64 : (step * 8) % 64 + 8]
        out = vq(x)
        g = loss_fn.generator_loss(x, out, step, vq.last_layer)
        opt_g.zero_grad()
        g["loss"].backward()
        opt_g.step()
        if loss_fn.disc_active(step):
            d = loss_fn.discriminator_loss(x, out.reconstruction, step)
            opt_d.zero_grad()
            d["loss"].backward()
            opt_d.step()
            assert g["adaptive_weight"] > 0
        rec.append(g["reconstruction_loss"].item())
    first, last = sum(rec[:5]) / 5, sum(rec[-5:]) / 5
    assert last < 0.65 * first, (first, last)
    assert any(not torch.equal(a, b) for a, b in zip(before, loss_fn.discriminator.parameters()))
    assert out.usage > 4 / 32
