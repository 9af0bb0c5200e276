"""VQ-GAN losses: GAN objectives, LeCAM, adaptive weight, discriminator, LPIPS."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from unimodal import VQGAN, VQGANConfig
from unimodal.vq.losses import (
    LPIPS,
    PatchDiscriminator,
    VQGANLoss,
    VQGANLossConfig,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    lecam_regularizer,
    non_saturating_d_loss,
    non_saturating_g_loss,
)

REAL = torch.tensor([2.0, 0.5, -0.5, 3.0])
FAKE = torch.tensor([-2.0, 0.5, 1.5, -0.5])


def test_hinge_losses_by_hand():
    # relu(1 - real) = [0, .5, 1.5, 0] -> mean .5; relu(1 + fake) = [0, 1.5, 2.5, .5] -> mean 1.125
    assert hinge_d_loss(REAL, FAKE).item() == pytest.approx(0.5 * (0.5 + 1.125))
    assert hinge_g_loss(FAKE).item() == pytest.approx(-FAKE.mean().item())


def test_non_saturating_losses_match_binary_cross_entropy():
    bce = F.binary_cross_entropy_with_logits
    expected_d = 0.5 * (bce(REAL, torch.ones(4)) + bce(FAKE, torch.zeros(4)))
    torch.testing.assert_close(non_saturating_d_loss(REAL, FAKE), expected_d)
    torch.testing.assert_close(non_saturating_g_loss(FAKE), bce(FAKE, torch.ones(4)))


def test_lecam_regularizer_by_hand():
    ema_real, ema_fake = torch.tensor(1.0), torch.tensor(0.0)
    # relu(real - 0)^2 = [4, .25, 0, 9] -> 3.3125; relu(1 - fake)^2 = [9, .25, 0, 2.25] -> 2.875
    assert lecam_regularizer(REAL, FAKE, ema_real, ema_fake).item() == pytest.approx(3.3125 + 2.875)


def test_patch_discriminator_shapes_and_size_error():
    d = PatchDiscriminator(3, channels=8, n_layers=2)
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    assert d(torch.zeros(1, 3, 12, 12)).shape == (1, 1, 1, 1)
    assert "main.0.weight" in d.state_dict() and "main.3.running_mean" in d.state_dict()
    with pytest.raises(ValueError, match="at least 12x12.*lower disc_layers"):
        d(torch.zeros(1, 3, 11, 11))


@pytest.fixture
def model_and_output():
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(codebook_size=16, image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                           z_channels=4, embed_dim=4, num_groups=4, use_l2_norm=False)).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    return vq, x, vq(x)


def test_adaptive_weight_is_the_ratio_of_gradient_norms(model_and_output):
    vq, x, out = model_and_output
    loss = VQGANLoss(VQGANLossConfig(disc_weight=0.5, disc_layers=1, disc_channels=8))
    nll = (x - out.reconstruction).abs().mean()
    g = -loss.discriminator(out.reconstruction).mean()
    grad_nll = torch.autograd.grad(nll, vq.last_layer, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, vq.last_layer, retain_graph=True)[0]
    by_hand = grad_nll.norm() / (grad_g.norm() + 1e-4)
    torch.testing.assert_close(adaptive_weight(nll, g, vq.last_layer), by_hand)
    logs = loss.generator_loss(x, out, global_step=0, last_layer=vq.last_layer)
    torch.testing.assert_close(logs["adaptive_weight"], 0.5 * by_hand)
    torch.testing.assert_close(logs["loss"], nll + 0.5 * by_hand * g + out.quant_loss)
    assert adaptive_weight(nll, g, vq.last_layer, max_weight=1e-3).item() == pytest.approx(1e-3)


def test_adaptive_weight_off_uses_disc_weight_and_needs_no_last_layer(model_and_output):
    _, x, out = model_and_output
    loss = VQGANLoss(VQGANLossConfig(disc_weight=0.3, adaptive_weight=False, disc_loss="non_saturating",
                                     disc_layers=1, disc_channels=8))
    logs = loss.generator_loss(x, out, global_step=0)
    assert logs["adaptive_weight"].item() == pytest.approx(0.3)
    g = non_saturating_g_loss(loss.discriminator(out.reconstruction))
    torch.testing.assert_close(logs["generator_loss"], g.detach())
    with pytest.raises(ValueError, match="last_layer"):
        VQGANLoss(VQGANLossConfig(disc_layers=1)).generator_loss(x, out, global_step=0)


def test_disc_start_switches_the_gan_terms_on(model_and_output):
    vq, x, out = model_and_output
    loss = VQGANLoss(VQGANLossConfig(disc_start=10, disc_layers=1, disc_channels=8, reconstruction_loss="l2"))
    before = loss.generator_loss(x, out, global_step=9, last_layer=vq.last_layer)
    assert before["generator_loss"] == 0 and before["adaptive_weight"] == 0
    torch.testing.assert_close(before["loss"], F.mse_loss(out.reconstruction, x) + out.quant_loss)
    with pytest.raises(ValueError, match="starts at step 10"):
        loss.discriminator_loss(x, out.reconstruction, global_step=9)
    after = loss.generator_loss(x, out, global_step=10, last_layer=vq.last_layer)
    assert after["generator_loss"] != 0 and after["adaptive_weight"] > 0
    d = loss.discriminator_loss(x, out.reconstruction, global_step=10)
    real, fake = loss.discriminator(x), loss.discriminator(out.reconstruction.detach())
    torch.testing.assert_close(d["disc_loss"], hinge_d_loss(real, fake).detach())


def test_discriminator_step_trains_only_the_discriminator_and_updates_lecam(model_and_output):
    vq, x, out = model_and_output
    loss = VQGANLoss(VQGANLossConfig(lecam_weight=0.1, lecam_decay=0.5, disc_layers=1, disc_channels=8))
    d = loss.discriminator_loss(x, out.reconstruction, global_step=0)
    d["loss"].backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    assert all(p.grad is None for p in vq.parameters()), "the reconstruction is detached"
    # EMAs moved halfway from 0 to the batch means, and the regulariser used them
    assert loss.lecam_ema_real.item() == pytest.approx(0.5 * d["logits_real"].item(), abs=1e-6)
    assert loss.lecam_ema_fake.item() == pytest.approx(0.5 * d["logits_fake"].item(), abs=1e-6)
    torch.testing.assert_close(d["loss"].detach(), d["disc_loss"] + 0.1 * d["lecam_loss"])
    assert d["lecam_loss"] > 0


@pytest.fixture(scope="module")
def lpips_ref():
    torch.manual_seed(0)
    lpips = LPIPS()
    for p in lpips.parameters():  # heads are non-negative in the released weights
        p.data.abs_()
    return lpips


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory, lpips_ref):
    """The weights as users have them: torchvision's VGG16 file (with its classifier) and the
    lpips package's head file in one folder; and our own state dict as one safetensors file."""
    root = tmp_path_factory.mktemp("lpips")
    state = lpips_ref.state_dict()
    trunk = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    (root / "folder").mkdir()
    torch.save({**trunk, "classifier.0.weight": torch.zeros(2, 2)}, root / "folder" / "vgg16-397923af.pth")
    torch.save({k: v for k, v in state.items() if k.startswith("lin")}, root / "folder" / "vgg.pth")
    save_file(state, root / "lpips.safetensors")
    return root


def test_lpips_math_with_random_weights(lpips_ref):
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    d = lpips_ref(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(lpips_ref(x, x), torch.zeros(2))
    torch.testing.assert_close(lpips_ref(y, x), d)
    lpips_ref.train()
    assert not lpips_ref.training and not any(p.requires_grad for p in lpips_ref.parameters())


def test_lpips_loads_torchvision_and_lpips_files(tmp_path, lpips_ref, lpips_files):
    x, y = torch.rand(1, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(LPIPS.from_pretrained(lpips_files / "folder")(x, y), lpips_ref(x, y))
    torch.testing.assert_close(LPIPS.from_pretrained(lpips_files / "lpips.safetensors")(x, y), lpips_ref(x, y))
    heads = {k: v for k, v in lpips_ref.state_dict().items() if k.startswith("lin")}
    torch.save(heads, tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match="lack 26 tensors"):
        LPIPS.from_pretrained(tmp_path)


def test_perceptual_loss_asked_for_but_absent_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-lpips"
    with pytest.raises(FileNotFoundError, match="no-such-lpips"):
        LPIPS.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="no-such-lpips"):
        VQGANLoss(VQGANLossConfig(perceptual_weight=1.0, lpips_path=str(missing)))
    with pytest.raises(ValueError, match="needs lpips_path"):
        VQGANLoss(VQGANLossConfig(perceptual_weight=1.0))


def test_perceptual_term_enters_the_generator_loss(lpips_files, model_and_output):
    vq, x, out = model_and_output
    cfg = VQGANLossConfig(perceptual_weight=2.0, lpips_path=str(lpips_files / "lpips.safetensors"), disc_start=100)
    loss = VQGANLoss(cfg)
    logs = loss.generator_loss(x, out, global_step=0)
    expected_p = loss.lpips(x, out.reconstruction).mean()
    assert expected_p > 0
    torch.testing.assert_close(logs["perceptual_loss"], expected_p.detach())
    rec = (x - out.reconstruction).abs().mean()
    torch.testing.assert_close(logs["loss"], rec + 2.0 * expected_p + out.quant_loss)
