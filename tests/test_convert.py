"""Converters of pretrained VQ tokenizers: parity with the reference implementations.

Each reference (transformers' JanusVQVAE, Emu3VQVAE, ChameleonVQVAE; diffusers' VQModel) is built
tiny and random in-process, its weights perturbed so no norm or bias sits at its trivial init, then
converted; our codes must equal the reference's and our decoded pixels match within 1e-5 (fp32).
"""

import argparse
import json
import math
import shlex
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from unimodal import VQGAN, VQGANConfig
from unimodal.cli import main as cli
from unimodal.vq.convert import (
    UnsafeCheckpointError,
    convert_checkpoint,
    fold_temporal_downsampling,
    from_diffusers,
    from_emu3,
    from_janus,
    from_llamagen,
    from_taming,
)
from unimodal.vq.modules import Decoder

TOL = dict(rtol=1e-5, atol=1e-5)


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every float tensor (norm affines, biases, BatchNorm statistics too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                scale = float(t.std()) if t.numel() > 1 and t.std() > 0 else 1.0
                t.add_(torch.randn(t.shape, generator=g) * 0.1 * scale)
    return model.eval()


def pixels(b=2, h=16, w=16, seed=1):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- Janus / LlamaGen


def tiny_janus():
    from transformers import JanusVQVAE, JanusVQVAEConfig

    torch.manual_seed(0)
    config = JanusVQVAEConfig(base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1, latent_channels=32,
                              embed_dim=8, num_embeddings=64, num_patches=8)
    return perturb(JanusVQVAE(config))


def cosine_codes(ref, x):
    """LlamaGen's lookup on the reference's own latents: nearest code by cosine similarity."""
    z = ref.quant_conv(ref.encoder(x))  # [B, 8, h, w]
    z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=1)
    return (z @ F.normalize(ref.quantize.embedding.weight, dim=1).T).argmax(1)  # [B*h*w]


@torch.no_grad()
def assert_janus_parity(ref, ours, x):
    codes = ours.encode(x)
    assert torch.equal(codes.flatten(), cosine_codes(ref, x))
    torch.testing.assert_close(ours.decode(codes), ref.decode(codes.flatten(1)), **TOL)


@torch.no_grad()
def test_janus_codes_and_pixels_match_transformers(tmp_path):
    ref, x = tiny_janus(), pixels()
    conversion = from_janus(ref)
    ours = conversion.model
    c = ours.config
    assert (c.use_l2_norm, c.image_size, c.attn_resolutions, c.mid_attention) == (True, 16, [8], True)
    assert_janus_parity(ref, ours, x)
    assert "JanusVQVAE.encode skips" in conversion.notes[0]
    # transformers' encode skips the l2 normalisation; with unit-length rows both lookups coincide
    ref.quantize.embedding.weight.copy_(F.normalize(ref.quantize.embedding.weight, dim=1))
    assert torch.equal(ref.encode(x).image_tokens, ours.encode(x).flatten())
    # a saved JanusVQVAE folder converts to the same tokenizer, which loads back from its folder
    ref.save_pretrained(tmp_path / "janus")
    convert_checkpoint("janus", tmp_path / "janus", tmp_path / "out")
    loaded = VQGAN.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.encode(x), ours.encode(x))


def _janus_model_folder(ref, folder):
    """A sharded Janus checkpoint folder: the VQ in shard 1, the (absent) LM listed in shard 2."""
    from transformers import JanusConfig

    folder.mkdir()
    JanusConfig(vq_config=ref.config.to_dict()).to_json_file(folder / "config.json")
    vq = {f"model.vqmodel.{k}": v.contiguous() for k, v in ref.state_dict().items()}
    save_file(vq, folder / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in vq}
    weight_map["model.language_model.embed_tokens.weight"] = "model-00002-of-00002.safetensors"  # never written
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_janus_model_folder_and_hub_repo_read_only_the_vq_shard(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    ref, x = tiny_janus(), pixels()
    _janus_model_folder(ref, tmp_path / "janus-pro")
    assert_janus_parity(ref, from_janus(tmp_path / "janus-pro").model, x)

    requested = []

    def hf_hub_download(repo_id, filename, **kwargs):  # the Hub, served from the folder above
        requested.append(filename)
        path = tmp_path / "janus-pro" / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    assert_janus_parity(ref, from_janus("someone/janus-pro-tiny").model, x)
    assert "model-00001-of-00002.safetensors" in requested
    assert "model-00002-of-00002.safetensors" not in requested


def _to_llamagen_layout(janus_state_dict, levels):
    """transformers' Janus names -> LlamaGen's published ones (tokenizer_image/vq_model.py)."""
    out = {}
    for key, value in janus_state_dict.items():
        for old, new in ((".mid.block_1.", ".mid.0."), (".mid.attn_1.", ".mid.1."), (".mid.block_2.", ".mid.2.")):
            key = key.replace(old, new)
        key = key.replace("encoder.down.", "encoder.conv_blocks.").replace("decoder.up.", "decoder.conv_blocks.")
        key = key.replace(".block.", ".res.")  # both run levels in execution order: indices stay
        out[key] = value
    out["quantize.codebook_used"] = torch.zeros(65536)
    for key in ("encoder.conv_blocks.0.res.0.norm1.weight", "encoder.conv_blocks.0.downsample.conv.weight",
                "encoder.conv_blocks.1.attn.0.q.weight", "encoder.mid.1.proj_out.weight", "decoder.mid.2.conv2.bias",
                f"decoder.conv_blocks.0.attn.{1}.k.weight", f"decoder.conv_blocks.{levels - 2}.upsample.conv.weight"):
        assert key in out, key
    return out


def test_llamagen_pt_converts_and_unsafe_pickles_explain_the_one_time_step(tmp_path):
    ref, x = tiny_janus(), pixels()
    model = _to_llamagen_layout(ref.state_dict(), levels=2)
    torch.save({"model": model, "discriminator": {"conv.weight": torch.randn(4, 3, 4, 4)},
                "optimizer": {"state": {}, "param_groups": []}, "steps": 100}, tmp_path / "vq.pt")
    conversion = from_llamagen(tmp_path / "vq.pt", image_size=16)
    assert_janus_parity(ref, conversion.model, x)
    assert any("quantize.codebook_used" in note for note in conversion.notes)

    # LlamaGen's trainer also pickles its argparse.Namespace: refused, with the command to run once
    torch.save({"model": model, "args": argparse.Namespace(image_size=256)}, tmp_path / "train.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace") as err:
        cli(["convert", "--format", "llamagen", str(tmp_path / "train.pt"), str(tmp_path / "out")])
    command = next(line.strip() for line in str(err.value).splitlines() if line.strip().startswith("python -c"))
    # the user's step, on a file this test wrote itself
    subprocess.run([sys.executable, *shlex.split(command)[1:]], check=True)
    cli(["convert", "--format", "llamagen", str(tmp_path / "train.safetensors"), str(tmp_path / "out"),
         "--image-size", "16"])
    assert_janus_parity(ref, VQGAN.from_pretrained(tmp_path / "out"), x)


# ----------------------------------------------------------------------------- Emu3


def tiny_emu3():
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    torch.manual_seed(0)
    config = Emu3VQVAEConfig(codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32,
                             channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[1], hidden_size=64,
                             temporal_downsample_factor=4)
    return perturb(Emu3VQVAE(config))


@torch.no_grad()
def test_emu3_image_codes_and_pixels_match_transformers(tmp_path, capsys):
    ref = tiny_emu3()
    x = pixels(h=16, w=24)  # Emu3 takes any multiple of 8, not just squares
    ref.save_pretrained(tmp_path / "emu3")
    cli(["convert", "--format", "emu3", str(tmp_path / "emu3"), str(tmp_path / "out"), "--image-size", "16"])
    assert "frame 0" in capsys.readouterr().out
    ours = VQGAN.from_pretrained(tmp_path / "out")
    c = ours.config
    latent = (c.decoder_norm, c.encoder_latent_convs, c.latent_res_blocks, c.decoder_latent_convs)
    assert latent == ("spatial", [8, 4], 1, 2)
    codes = ours.encode(x)
    ref_codes = torch.stack(ref.encode(x, image_sizes=torch.tensor([[16, 24]] * 2)).image_tokens)
    assert torch.equal(codes, ref_codes) and codes.unique().numel() > 4
    torch.testing.assert_close(ours.decode(codes), ref.decode(codes), **TOL)


@pytest.mark.parametrize("frames", [2, 4, 8])
@torch.no_grad()
def test_folded_temporal_downsampling_equals_emu3s_on_repeated_frames(frames):
    from transformers.models.emu3.modeling_emu3 import Emu3VQVAETemporalDownsample

    torch.manual_seed(frames)
    layers = [perturb(Emu3VQVAETemporalDownsample(3, 3)) for _ in range(int(math.log2(frames)))]
    image = torch.randn(2, 3, 5, 6)  # [B, C, H, W]
    ref = image.unsqueeze(2).repeat(1, 1, frames, 1, 1)  # [B, C, T, H, W], as Emu3 feeds an image
    for layer in layers:
        ref = F.silu(layer(ref))
    ours = image
    pairs = [(layer.conv.conv.weight, layer.conv.conv.bias) for layer in layers]
    for weight, bias in fold_temporal_downsampling(pairs, frames):
        ours = F.silu(F.conv2d(ours, weight, bias, padding=1))
    assert ref.shape[2] == 1
    torch.testing.assert_close(ours, ref[:, :, 0], **TOL)


# ----------------------------------------------------------------------------- diffusers

DIFFUSERS = {
    # taming's layout: GroupNorm(8), middle attention only, codes narrower than the latents
    "group": dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(16, 32), layers_per_block=1, latent_channels=8, vq_embed_dim=4,
                  num_vq_embeddings=32, norm_num_groups=8, sample_size=16),
    # MoVQ (Kandinsky): spatial norms, attention blocks at the lowest level, no middle attention
    "movq": dict(down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                 up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 64),
                 layers_per_block=1, latent_channels=4, num_vq_embeddings=64, norm_num_groups=32,
                 norm_type="spatial", mid_block_add_attention=False, sample_size=16),
}


@pytest.mark.parametrize("kind", DIFFUSERS)
@torch.no_grad()
def test_diffusers_vqmodel_codes_and_pixels_match(kind, tmp_path):
    from diffusers import VQModel

    torch.manual_seed(0)
    ref, x = perturb(VQModel(**DIFFUSERS[kind])), pixels()
    # saved inside a pipeline folder, as LDM / Kandinsky / aMUSEd ship it
    ref.save_pretrained(tmp_path / "pipe" / "vqvae")
    index = {"_class_name": "X", "vqvae": ["diffusers", "VQModel"]}
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(index))
    ours = convert_checkpoint("diffusers", tmp_path / "pipe").model
    assert ours.config.mid_attention == (kind == "group")
    assert ours.config.decoder_norm == DIFFUSERS[kind].get("norm_type", "group")
    h = ref.encode(x).latents
    torch.testing.assert_close(ours.encode_latents(x), h, **TOL)
    _, _, (_, _, ref_codes) = ref.quantize(h)
    codes = ours.encode(x)
    assert torch.equal(codes.flatten(), ref_codes.flatten())
    torch.testing.assert_close(ours.decode(codes), ref.decode(h).sample, **TOL)
    torch.testing.assert_close(from_diffusers(ref).model.decode(codes), ours.decode(codes), **TOL)


# ----------------------------------------------------------------------------- taming / Chameleon


def _taming_yaml(attn_type):
    ddconfig = dict(double_z=False, z_channels=8, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[8], dropout=0.0, attn_type=attn_type)
    loss = dict(target="taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator", params=dict(disc_start=0))
    return {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel",
                      "params": dict(embed_dim=8, n_embed=64, ddconfig=ddconfig, lossconfig=loss)}}


@pytest.mark.parametrize("attn_type", ["vanilla", "none"])
@torch.no_grad()
def test_chameleon_lightning_checkpoint_and_yaml_convert_through_the_cli(attn_type, tmp_path, capsys):
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    torch.manual_seed(0)
    ref = perturb(ChameleonVQVAE(ChameleonVQVAEConfig(
        embed_dim=8, num_embeddings=64, latent_channels=8, resolution=16, base_channels=32, channel_multiplier=[1, 2],
        num_res_blocks=1, attn_resolutions=[8], attn_type=attn_type)))
    # Chameleon's checkpoint has the decoder too (transformers drops it): taming's names, random weights
    attention = attn_type == "vanilla"
    twin = VQGANConfig(codebook_size=64, image_size=16, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                       attn_resolutions=[8] if attention else [], z_channels=8, embed_dim=8, use_l2_norm=False,
                       mid_attention=attention)
    decoder = {k: v for k, v in perturb(VQGAN(twin), seed=3).state_dict().items() if k.startswith("decoder.")}
    source = {**ref.state_dict(), **decoder, "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
              "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 8, 1, 1)}
    torch.save({"state_dict": source, "global_step": 7, "epoch": 1}, tmp_path / "vqgan.ckpt")
    (tmp_path / "vqgan.yaml").write_text(yaml.safe_dump(_taming_yaml(attn_type)))

    cli(["convert", "--format", "taming", str(tmp_path / "vqgan.ckpt"), str(tmp_path / "out"),
         "--config", str(tmp_path / "vqgan.yaml")])
    assert "dropped 2 tensors under loss.*" in capsys.readouterr().out
    ours = VQGAN.from_pretrained(tmp_path / "out")
    assert ours.config.mid_attention == attention
    assert ours.config.attn_resolutions == ([8] if attention else [])
    for key, value in ours.state_dict().items():  # every tensor lands under the same taming name
        assert torch.equal(value, source[key]), key
    x = pixels(b=3)
    assert torch.equal(ours.encode(x).flatten(), ref.encode(x).image_tokens)
    # without the yaml the architecture is read from the tensors: the same tokenizer
    inferred = from_taming(tmp_path / "vqgan.ckpt")
    assert any("no yaml" in note for note in inferred.notes)
    assert torch.equal(inferred.model.encode(x), ours.encode(x))
    torch.testing.assert_close(inferred.model.decode(ours.encode(x)), ours.decode(ours.encode(x)), **TOL)


def test_conversion_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="unknown format 'vqgan'"):
        convert_checkpoint("vqgan", tmp_path)
    with pytest.raises(ValueError, match="--config is for the taming format"):
        convert_checkpoint("llamagen", tmp_path / "x.pt", config=tmp_path / "x.yaml")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        from_taming(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        from_emu3(tmp_path / "missing")
    vq = VQGAN(VQGANConfig(codebook_size=64, image_size=16, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                           attn_resolutions=[8], z_channels=8, embed_dim=8))
    torch.save({"state_dict": vq.state_dict()}, tmp_path / "vq.ckpt")
    config = _taming_yaml("vanilla")
    config["model"]["params"]["ddconfig"]["ch_mult"] = [1, 4]  # a yaml of another model
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"do not fit .* wrong shape"):
        from_taming(tmp_path / "vq.ckpt", tmp_path / "wrong.yaml")
    with pytest.raises(ValueError, match="--format llamagen"):  # LlamaGen's names, read as taming's
        from_taming(_to_llamagen_layout(tiny_janus().state_dict(), levels=2))
    config["model"]["target"] = "taming.models.vqgan.GumbelVQ"
    (tmp_path / "gumbel.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="Gumbel"):
        from_taming(tmp_path / "vq.ckpt", tmp_path / "gumbel.yaml")


# ----------------------------------------------------------------------------- the VQGAN options


def test_new_vqgan_options_validate_and_survive_save_load(tmp_path):
    base = dict(codebook_size=32, image_size=16, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8],
                z_channels=4, embed_dim=4, use_l2_norm=False)
    with pytest.raises(ValueError, match="decoder_norm"):
        VQGANConfig(**base, decoder_norm="batch")
    with pytest.raises(ValueError, match="must be z_channels=4"):
        VQGANConfig(**base, encoder_latent_convs=[8, 6])
    with pytest.raises(ValueError, match=r"embed_dim \(2\) must equal z_channels"):
        VQGANConfig(**{**base, "embed_dim": 2}, decoder_norm="spatial", latent_res_blocks=1)
    config = VQGANConfig(**base, decoder_norm="spatial", encoder_latent_convs=[8, 4], latent_res_blocks=1,
                         decoder_latent_convs=1, mid_attention=False)
    vq = perturb(VQGAN(config))
    assert not any(".mid.attn_1." in k for k in vq.state_dict())
    assert vq.decoder.latent_blocks[0].norm1.running_var.min() >= 0.5  # perturbed, not the init's 1.0
    vq.save_pretrained(tmp_path)
    loaded = VQGAN.from_pretrained(tmp_path)
    for key, value in vq.state_dict().items():  # BatchNorm statistics included
        assert torch.equal(loaded.state_dict()[key], value), key
    x = pixels()
    assert torch.equal(loaded.decode(loaded.encode(x)), vq.decode(vq.encode(x)))
    with pytest.raises(ValueError, match="pass the quantised latents"):
        vq.decoder(torch.zeros(1, 4, 8, 8))


def test_spatial_norm_decoder_is_conditioned_on_the_codes():
    # same input to the decoder body, different conditioning codes -> different pixels
    torch.manual_seed(0)
    decoder = perturb(Decoder(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], out_channels=3,
                              resolution=16, z_channels=4, norm_type="spatial", cond_channels=4))
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        a, b = decoder(z, torch.randn(1, 4, 8, 8)), decoder(z, torch.randn(1, 4, 8, 8))
    assert a.shape == (1, 3, 16, 16) and (a - b).abs().mean() > 1e-3
