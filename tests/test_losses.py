"""Tests for losses.py: each loss term against values computed by hand, the GAN
schedule, and the missing-weights error. Random weights only (no downloads)."""

import dataclasses

import pytest
import torch

import losses
from losses import (
    LeCAM, LossConfig, PatchDiscriminator, PerceptualLoss, TokenizerLoss, hinge_d_loss, hinge_g_loss,
)  # fmt: skip

torch.manual_seed(0)


class FakePosterior:
    """Stands in for tokenizer.DiagonalGaussian: kl() -> (B,) summed over token dims."""

    def __init__(self, kl):
        self._kl = kl

    def kl(self):
        return self._kl


@pytest.fixture(scope="module")
def tiny_loss():
    return TokenizerLoss(losses.PRESETS["tiny"])


def vq_extras():
    return dict(quantizer_loss=torch.tensor(0.5), commitment_loss=torch.tensor(0.1), codebook_loss=torch.tensor(0.4))


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - x) = 0, 0.5, 2   -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + x) = 0, 1, 2     -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)  # -mean(fake)
    # A perfectly separated discriminator pays nothing.
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


def test_lecam_values_and_ema():
    lecam = LeCAM(decay=0.9)
    lecam.ema_real.fill_(1.0)
    lecam.ema_fake.fill_(-1.0)
    # Means sitting exactly on the other side's EMA (or inside the band) cost nothing.
    assert lecam(torch.tensor(-1.0), torch.tensor(1.0)).item() == 0.0
    assert lecam(torch.tensor(-2.0), torch.tensor(3.0)).item() == 0.0
    # Past it: relu(real - ema_fake)^2 + relu(ema_real - fake)^2 = 3^2 + 1^2.
    assert lecam(torch.tensor(2.0), torch.tensor(0.0)).item() == pytest.approx(10.0)
    lecam.update(torch.tensor(2.0), torch.tensor(0.0))
    assert lecam.ema_real.item() == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
    assert lecam.ema_fake.item() == pytest.approx(0.9 * -1.0 + 0.1 * 0.0)


def test_discriminator_shapes_and_blur():
    D = PatchDiscriminator(hidden=32, num_stages=2)
    out = D(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    # The blur kernel is a normalised low-pass filter: a constant image stays constant.
    blur = losses.BlurDownsample(4)
    y = blur(torch.full((1, 2, 8, 8), 0.7))
    assert y.shape == (1, 2, 4, 4)
    assert torch.allclose(y[..., 1:-1, 1:-1], torch.tensor(0.7))  # interior (borders see zero padding)
    assert blur(torch.rand(1, 1, 7, 7)).shape == (1, 1, 4, 4)  # "same": ceil(7 / 2)


@pytest.fixture(scope="module")
def both_backbones():
    # Built once: a random ConvNeXt-S alone takes ~2 s to initialise.
    torch.manual_seed(0)
    return PerceptualLoss("resnet50-convnext_s-1.0-0.1", pretrained=False, resize=32)


def test_perceptual_zero_for_identical_positive_otherwise(both_backbones):
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    for name, term in both_backbones.terms.items():
        assert term(x, x.clone()).item() == pytest.approx(0.0, abs=1e-10), name
        d = term(x, y)
        assert d.item() > 0 and torch.isfinite(d), name
    # Other input sizes are resized to the classifier's (here 32 px) first.
    assert both_backbones(torch.rand(1, 3, 48, 48), torch.rand(1, 3, 48, 48))[0].item() > 0


def test_perceptual_spec_parsing_and_no_checkpoint_bloat(both_backbones):
    perc = both_backbones
    assert perc.weights == {"resnet50": 1.0, "convnext_s": 0.1}
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    total, parts = perc(x, y)
    want = (1.0 * parts["resnet50"] + 0.1 * parts["convnext_s"]) / 1.1  # the official averaging
    assert total.item() == pytest.approx(want.item(), rel=1e-5)
    # Frozen nets: no parameters to optimise, nothing in the state dict.
    assert list(perc.parameters()) == [] and perc.state_dict() == {}
    for bad in ("vgg", "resnet50-1.0-2.0", "convnext_s-x"):
        with pytest.raises(ValueError, match="bad perceptual spec"):
            PerceptualLoss(bad, pretrained=False)


def test_lpips_random_weights_zero_and_positive():
    lp = losses.LPIPS(pretrained=False)
    x = torch.rand(1, 3, 32, 32)
    assert lp(x, x).item() == pytest.approx(0.0, abs=1e-10)
    assert lp(x, torch.rand(1, 3, 32, 32)).item() != 0.0


def test_missing_weights_error_says_how(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(FileNotFoundError, match="TORCH_HOME") as e:
        PerceptualLoss("resnet50", pretrained=True, allow_download=False)
    assert "resnet50-0676ba61.pth" in str(e.value) and "perceptual_pretrained=False" in str(e.value)
    with pytest.raises(FileNotFoundError, match="pip install lpips"):
        losses.LPIPS(pretrained=True, weights_path=str(tmp_path / "nope.pth"), allow_download=False)


def test_generator_loss_vq_before_and_after_discriminator_start(tiny_loss):
    cfg = tiny_loss.config
    x = torch.rand(2, 3, 32, 32)
    r = torch.rand(2, 3, 32, 32, requires_grad=True)
    assert not tiny_loss.discriminator_active(cfg.discriminator_start - 1)
    total, logs = tiny_loss.generator_loss(x, r, vq_extras(), step=0)
    assert "gan" not in logs  # the GAN term is absent before the start step
    want = logs["recon"] + logs["perceptual"] + logs["quantizer"]
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    assert logs["recon"].item() == pytest.approx(torch.mean((x - r) ** 2).item(), rel=1e-6)
    total.backward()
    assert r.grad is not None and torch.isfinite(r.grad).all()

    r.grad = None
    total, logs = tiny_loss.generator_loss(x, r, vq_extras(), step=cfg.discriminator_start)
    assert "gan" in logs and torch.isfinite(total)
    want = logs["recon"] + logs["perceptual"] + logs["quantizer"] + logs["gan"]
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    total.backward()
    # The generator pass must not train the discriminator.
    assert all(p.grad is None for p in tiny_loss.discriminator.parameters())


def test_generator_loss_kl():
    cfg = dataclasses.replace(losses.PRESETS["tiny"], perceptual="none", perceptual_weight=0.0, kl_weight=1e-6)
    loss = TokenizerLoss(cfg)
    x = torch.rand(2, 3, 32, 32)
    total, logs = loss.generator_loss(x, x.clone(), {"posterior": FakePosterior(torch.tensor([100.0, 300.0]))}, 0)
    assert logs["kl"].item() == pytest.approx(1e-6 * 200.0)  # sum over tokens (given), mean over batch
    assert total.item() == pytest.approx(1e-6 * 200.0)
    with pytest.raises(KeyError, match="quantizer_loss"):
        loss.generator_loss(x, x, {}, 0)


def test_discriminator_loss_schedule_and_lecam(tiny_loss):
    cfg = tiny_loss.config
    x, r = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    zero, logs = tiny_loss.discriminator_loss(x, r, step=0)
    assert zero.item() == 0.0 and logs == {}
    before = tiny_loss.lecam.ema_real.clone()
    total, logs = tiny_loss.discriminator_loss(x, r, step=cfg.discriminator_start)
    assert torch.isfinite(total)
    assert total.item() == pytest.approx((logs["hinge"] + logs["lecam"]).item(), rel=1e-6)
    total.backward()
    grads = [p.grad for p in tiny_loss.discriminator.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # EMA moved towards the batch mean, by (1 - decay).
    d = cfg.lecam_decay
    assert tiny_loss.lecam.ema_real.item() == pytest.approx(d * before.item() + (1 - d) * logs["logits_real"].item())


def test_state_dict_is_discriminator_and_lecam_only(tiny_loss):
    keys = tiny_loss.state_dict().keys()
    assert all(k.startswith(("discriminator.", "lecam.")) for k in keys)
    assert {"lecam.ema_real", "lecam.ema_fake"} <= set(keys)
    fresh = TokenizerLoss(losses.PRESETS["tiny"])
    fresh.load_state_dict(tiny_loss.state_dict())  # strict round trip


def test_presets_and_official_defaults():
    c = LossConfig()
    assert (c.reconstruction_weight, c.perceptual_weight, c.discriminator_weight) == (1.0, 1.1, 0.1)
    assert (c.discriminator_start, c.lecam_weight, c.kl_weight, c.quantizer_weight) == (200_000, 0.001, 1e-6, 1.0)
    assert c.perceptual == "lpips-convnext_s-1.0-0.1" and c.lecam_decay == 0.999
    assert {"official", "paper_resnet50", "shapes", "tiny"} <= set(losses.PRESETS)
    shapes = TokenizerLoss(losses.PRESETS["shapes"])  # builds with no download at all
    assert shapes.perceptual is None and shapes.discriminator is not None
