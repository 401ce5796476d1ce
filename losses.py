"""Losses for training the TA-TiTok tokenizer in one stage.

Paper §4.1, "Improved one-stage training recipe": TA-TiTok drops TiTok's two-stage (proxy-code
distillation) training and trains pixels-to-pixels directly, with two ideas from MaskBit (Weber et
al. 2024): a perceptual loss on a modern ImageNet classifier (ResNet-50, richer features than LPIPS'
VGG), and a stronger PatchGAN discriminator (blur-kernel instead of average-pool downsampling, LeCAM
regularisation of its logits). The released training configs (NOTES.md, "Training recipe") set L2
reconstruction x 1.0, perceptual x 1.1 with "lpips-convnext_s-1.0-0.1" = (1.0 * LPIPS(VGG-16) + 0.1 *
MSE of ConvNeXt-S *logits*) / 1.1, GAN x 0.1 from step 200k (hinge loss, no adaptive weight), LeCAM
x 0.001, and KL x 1e-6 (KL variant) or the quantizer loss x 1.0 (VQ variant). The paper's text
describes MaskBit's ResNet-50 variant; LossConfig.perceptual picks either.

Data flow, in the order the pieces appear below:
    images, recon (B,3,H,W) in [0,1]
      -> PerceptualLoss     frozen torchvision nets (ResNet-50 / ConvNeXt-S logits, LPIPS)
      -> PatchDiscriminator blur-downsampling N-layer PatchGAN -> (B,1,16,16) logits
      -> hinge_d_loss / hinge_g_loss, LeCAM (EMA of mean real / fake logits)
      -> TokenizerLoss      the weighted sum, the step schedule, logging dicts

Public API:
    loss = TokenizerLoss(LossConfig())           # official numbers; PRESETS["tiny"] for tests
    g, logs = loss.generator_loss(images, recon, extras, step)      # for the tokenizer
    if loss.discriminator_active(step):
        d, logs = loss.discriminator_loss(images, recon, step)      # for loss.discriminator
    loss.state_dict()                            # the discriminator + LeCAM EMAs only
"""

import importlib.util
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# torchvision is imported lazily (inside the builders): the discriminator and the loss maths work without
# it, and importing it costs ~1 s. torchvision's classifiers take (x - mean) / std of [0, 1] images.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# -----------------------------------------------------------------------------
# Frozen backbones from torchvision.

def _load_weights(weights, allow_download=True):
    """State dict of a torchvision weight enum. torchvision downloads it into the torch.hub cache
    on first use; offline that fails deep inside urllib, so say which file is needed and where."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))  # $TORCH_HOME/hub/...
    hint = (f"the frozen perceptual network needs the torchvision weights {weights} ({weights.url}). "
            f"Fix: run once on a machine with internet (they download to {path}), or copy that file "
            f"there, or point TORCH_HOME at a directory that holds hub/checkpoints/{os.path.basename(path)}. "
            f"For tests and quick experiments use LossConfig(perceptual_pretrained=False) (random weights).")
    if not os.path.exists(path) and not allow_download:
        raise FileNotFoundError(f"weights not found at {path}: {hint}")
    try:
        return weights.get_state_dict(progress=True)  # loads from the cache if present
    except Exception as e:  # network errors come in many types (URLError, OSError, ...)
        raise RuntimeError(f"could not load or download {weights}: {e}. {hint}") from e


def _freeze_as_buffers(module):
    """Turn every parameter and buffer of a frozen net into a non-persistent buffer: it follows
    .to(device) and passes gradients *through* to the reconstruction, but gets no .grad, no optimizer
    or DDP sees it, and it stays out of checkpoints (ConvNeXt-S alone is 200 MB; torchvision rebuilds it)."""
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            delattr(m, name)
            m.register_buffer(name, p.detach(), persistent=False)
        for name, b in list(m.named_buffers(recurse=False)):
            m.register_buffer(name, b, persistent=False)
    return module.eval()


class ClassifierPerceptual(nn.Module):
    """MSE between a frozen ImageNet classifier's *logits* on two images (MaskBit's default, the official
    ConvNeXt-S term): the reconstruction should be recognised as the same thing. on_logits=False adds the
    last feature map (ResNet-50 layer4 (B,2048,7,7) / ConvNeXt-S (B,768,7,7)). Inputs: resized to 224."""

    def __init__(self, arch="resnet50", pretrained=True, on_logits=True, resize=224, allow_download=True):
        super().__init__()
        from torchvision import models

        # arch: a name PerceptualLoss has checked. MaskBit uses the V1 (original) ResNet-50 weights.
        build, weights = {"resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
                          "convnext_s": (models.convnext_small, models.ConvNeXt_Small_Weights.IMAGENET1K_V1)}[arch]
        net = build(weights=None)
        if pretrained:
            net.load_state_dict(_load_weights(weights, allow_download))
        self.net = _freeze_as_buffers(net)
        self.arch, self.on_logits, self.resize = arch, on_logits, resize
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x, y):  # x, y: (B, 3, H, W) in [0, 1]
        xy = torch.cat([x, y])  # one pass through the net for both: (2B, 3, H, W)
        if xy.shape[-2:] != (self.resize, self.resize):
            xy = F.interpolate(xy, size=self.resize, mode="bilinear", align_corners=False, antialias=True)
        n, xy = self.net, (xy - self.mean) / self.std
        if self.arch == "resnet50":
            xy = n.maxpool(n.relu(n.bn1(n.conv1(xy))))
            feat = n.layer4(n.layer3(n.layer2(n.layer1(xy))))  # (2B, 2048, 7, 7)
            logits = n.fc(torch.flatten(n.avgpool(feat), 1))  # (2B, 1000)
        else:
            feat = n.features(xy)  # (2B, 768, 7, 7)
            logits = n.classifier(n.avgpool(feat))  # (2B, 1000); classifier = LN2d, flatten, linear
        loss = F.mse_loss(*logits.chunk(2))
        return loss if self.on_logits else loss + F.mse_loss(*feat.chunk(2))

    def train(self, mode=True):  # BatchNorm / dropout stay in inference mode, always
        return super().train(False)


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) with its VGG-16 backbone, as in the official config:
    d(x, y) = sum over 5 VGG stages l of mean_{h,w} || w_l * (n(f_l(x)) - n(f_l(y))) ||^2, n() unit-
    normalising each feature vector, w_l the learned per-channel "lin" weights. VGG comes from torchvision,
    the lin weights from LPIPS' own v0.1 "vgg.pth" (inside the `lpips` pip package, or pass its path)."""

    # The VGG-16 `features` indices that end the 5 stages (relu1_2 .. relu5_3).
    STAGE_ENDS = (4, 9, 16, 23, 30)
    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self, pretrained=True, weights_path=None, allow_download=True):
        super().__init__()
        from torchvision import models
        from torchvision.models.vgg import cfgs as vgg_cfgs, make_layers

        # Resolve LPIPS' own weight file first: it is the one most likely to be missing.
        lin_path, spec = weights_path, importlib.util.find_spec("lpips") if weights_path is None else None
        if spec is not None and spec.submodule_search_locations:  # the file ships inside the lpips package
            lin_path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", "vgg.pth")
        if pretrained and (lin_path is None or not os.path.exists(lin_path)):
            raise FileNotFoundError(f"LPIPS needs its learned linear-layer weights (v0.1 'vgg.pth'; looked for "
                                    f"{lin_path}). Fix: `pip install lpips` (the file ships inside that package), or "
                                    "pass LossConfig(lpips_weights='/path/to/vgg.pth'), or choose a perceptual "
                                    "setting without LPIPS (perceptual='resnet50' or 'convnext_s').")
        # Only VGG-16's convolutional trunk: its 120M-parameter classifier is never used.
        feats = make_layers(vgg_cfgs["D"])  # the same layers as models.vgg16().features
        if pretrained:
            sd = _load_weights(models.VGG16_Weights.IMAGENET1K_V1, allow_download)
            feats.load_state_dict({k[len("features.") :]: v for k, v in sd.items() if k.startswith("features.")})
        self.stages = nn.ModuleList(feats[a:b] for a, b in zip((0,) + self.STAGE_ENDS[:-1], self.STAGE_ENDS))
        for m in self.stages.modules():  # in-place ReLU would overwrite the stage outputs we keep
            if isinstance(m, nn.ReLU):
                m.inplace = False
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS)
        if pretrained:
            sd = torch.load(lin_path, map_location="cpu", weights_only=True)
            for i, lin in enumerate(self.lins):
                # The release names them lin{i}.model.1.weight (index 0 is a Dropout).
                key = next((k for k in (f"lin{i}.model.1.weight", f"lin{i}.model.0.weight") if k in sd), None)
                if key is None:
                    raise KeyError(f"{lin_path} has no weights for LPIPS layer lin{i}; is it LPIPS v0.1 vgg.pth?")
                lin.weight.data.copy_(sd[key])
        _freeze_as_buffers(self)
        # LPIPS' input scaling, for inputs in [-1, 1] (constants of the LPIPS release).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x, y):  # x, y: (B, 3, H, W) in [0, 1]
        h = (torch.cat([x, y]) * 2 - 1 - self.shift) / self.scale  # LPIPS takes [-1, 1] inputs: (2B, 3, H, W)
        total = 0.0
        for stage, lin in zip(self.stages, self.lins):
            h = stage(h)  # (2B, C_l, H_l, W_l)
            n = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit feature vectors
            a, b = n.chunk(2)
            total = total + lin((a - b).pow(2)).mean(dim=(1, 2, 3))  # (B,)
        return total.mean()

    def train(self, mode=True):
        return super().train(False)


class PerceptualLoss(nn.Module):
    """A weighted average of perceptual terms, named as in the official configs: components joined by '-',
    optionally followed by one weight each ("resnet50": MaskBit / the paper; "convnext_s";
    "lpips-convnext_s-1.0-0.1": the official setting) -> sum_i w_i * L_i / sum_i w_i (official averaging)."""

    COMPONENTS = ("lpips", "convnext_s", "resnet50")

    def __init__(self, spec, pretrained=True, on_logits=True, resize=224, lpips_weights=None, allow_download=True):
        super().__init__()
        parts = spec.split("-")
        names = [p for p in parts if p in self.COMPONENTS]
        rest = parts[len(names) :]
        try:
            ok = names and parts[: len(names)] == names and len(rest) in (0, len(names))
            weights = [float(w) for w in rest] if rest else [1.0] * len(names)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"bad perceptual spec {spec!r}: expected components from {self.COMPONENTS} "
                             f"joined by '-', optionally followed by one weight each, e.g. 'resnet50' or "
                             f"'lpips-convnext_s-1.0-0.1'")
        self.weights = dict(zip(names, weights))
        self.terms = nn.ModuleDict({name: LPIPS(pretrained, lpips_weights, allow_download) if name == "lpips" else
                                    ClassifierPerceptual(name, pretrained, on_logits, resize, allow_download)
                                    for name in names})

    def forward(self, x, y):
        """x, y: (B, 3, H, W) in [0, 1] -> (scalar weighted average, {name: unweighted term})."""
        parts = {name: term(x, y) for name, term in self.terms.items()}
        total = sum(self.weights[n] * v for n, v in parts.items()) / sum(self.weights.values())
        return total, parts


# -----------------------------------------------------------------------------
# The discriminator: an N-layer PatchGAN with blur downsampling (MaskBit's VQGAN+).

class BlurDownsample(nn.Module):
    """Anti-aliased 2x downsampling: a fixed binomial low-pass filter ([1,3,3,1] outer itself, normalised,
    as StyleGAN / Zhang 2019), then stride 2. Average pooling (a box filter) lets high frequencies alias;
    this keeps D's judgement smooth under small shifts. TensorFlow-"same" padding: size ceil(H / 2)."""

    KERNELS = {3: (1, 2, 1), 4: (1, 3, 3, 1), 5: (1, 4, 6, 4, 1)}

    def __init__(self, taps=4):
        super().__init__()
        k = torch.tensor(self.KERNELS[taps], dtype=torch.float32)
        k = k[:, None] * k[None, :]
        self.register_buffer("kernel", (k / k.sum())[None, None], persistent=False)  # (1, 1, t, t)

    def forward(self, x):  # (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))
        C, H, W = x.shape[-3:]
        t = self.kernel.shape[-1]
        # "same" padding total for stride 2 (the official computes it for a 4-wide
        # window regardless of taps; for 4 taps, the default, the two agree).
        ph, pw = (max((math.ceil(n / 2) - 1) * 2 + t - n, 0) for n in (H, W))
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.kernel.expand(C, 1, t, t).to(x.dtype), stride=2, groups=C)


class PatchDiscriminator(nn.Module):
    """Conv 5x5 -> num_stages x [conv 3x3, blur-downsample, GroupNorm, LeakyReLU] -> adaptive max-pool to
    a 16x16 patch grid (whatever the input size) -> 1x1 conv, 5x5 conv -> one logit per patch. Widths
    128 -> 128 -> 256 -> 512 by default (the official NLayerDiscriminator, whose names it keeps); convs
    are stride 1, "same" padding: only the blur downsamples."""

    def __init__(self, in_channels=3, hidden=128, num_stages=3, blur_taps=4, pool_size=16):
        super().__init__()
        if hidden % 32:
            raise ValueError(f"discriminator hidden width must be a multiple of 32 (GroupNorm(32)), got {hidden}")
        act = lambda: nn.LeakyReLU(0.1)  # noqa: E731  (slope 0.1 as MaskBit)
        self.block_in = nn.Sequential(nn.Conv2d(in_channels, hidden, 5, padding=2), act())
        # Stage widths: the first keeps `hidden`, then each doubles: 128 -> 128 -> 256 -> 512.
        chans = [hidden] + [hidden * 2**i for i in range(num_stages)]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), BlurDownsample(blur_taps), nn.GroupNorm(32, cout), act())
            for cin, cout in zip(chans[:-1], chans[1:]))
        self.pool = nn.AdaptiveMaxPool2d(pool_size)
        self.to_logits = nn.Sequential(nn.Conv2d(chans[-1], chans[-1], 1), act(), nn.Conv2d(chans[-1], 1, 5, padding=2))

    def forward(self, x):  # (B, 3, H, W) in [0, 1]
        h = self.block_in(x)  # (B, hidden, H, W)
        for block in self.blocks:
            h = block(h)  # (B, C_next, ceil(H/2), ceil(W/2))
        return self.to_logits(self.pool(h))  # (B, 1, 16, 16) logits, one per patch


# -----------------------------------------------------------------------------
# Adversarial losses and LeCAM.

def hinge_d_loss(logits_real, logits_fake):
    """Real logits above +1, fakes below -1: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(G(x)))) (taming)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake):
    """Generator side of the hinge GAN: raise the discriminator's logits on fakes."""
    return -logits_fake.mean()


class LeCAM(nn.Module):
    """LeCAM regularisation (Tseng et al. 2021) as in MaskBit / the official code: EMAs (from 0, decay
    0.999) of the batch-mean real and fake logits, and a penalty on the current means for drifting past
    the *other* side's EMA, which stops D from driving real and fake logits ever further apart (how it
    overfits on limited data): relu(mean D(real) - ema_fake)^2 + relu(ema_real - mean D(fake))^2, relu
    on the batch *means* as in the official code (the LeCAM paper: per sample)."""

    def __init__(self, decay=0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, real_mean, fake_mean):  # scalars: batch-mean logits
        return F.relu(real_mean - self.ema_fake).pow(2) + F.relu(self.ema_real - fake_mean).pow(2)

    @torch.no_grad()
    def update(self, real_mean, fake_mean):
        means = torch.stack([real_mean.detach().float(), fake_mean.detach().float()])
        # Under DDP, average over ranks so every rank keeps the same EMA, that of a single process
        # with the global batch (the official code keeps rank-local EMAs, which drift apart).
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(means)
            means /= dist.get_world_size()
        self.ema_real.mul_(self.decay).add_(means[0] * (1 - self.decay))
        self.ema_fake.mul_(self.decay).add_(means[1] * (1 - self.decay))


# -----------------------------------------------------------------------------
# The combiner.

@dataclass
class LossConfig:
    # Defaults are the official TA-TiTok training config (configs/training/TA-TiTok/*).
    reconstruction_weight: float = 1.0  # L2 ("reconstruction_loss: l2")
    perceptual: str = "lpips-convnext_s-1.0-0.1"  # or "resnet50" (paper / MaskBit), "convnext_s", "none"
    perceptual_weight: float = 1.1
    perceptual_pretrained: bool = True  # False: random weights (tests only; the loss is meaningless)
    perceptual_on_logits: bool = True  # MaskBit default; False adds the last feature map
    perceptual_resize: int = 224  # the classifiers' input size
    lpips_weights: str = None  # path to LPIPS v0.1 vgg.pth; None: look inside the `lpips` package
    discriminator_start: int = 200_000  # step at which the GAN terms switch on
    discriminator_weight: float = 0.1  # fixed weight (official: no adaptive weight); 0 disables the GAN
    disc_hidden: int = 128
    disc_stages: int = 3
    disc_blur_taps: int = 4
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999
    quantizer_weight: float = 1.0  # VQ: times extras["quantizer_loss"] (commitment + codebook)
    kl_weight: float = 1e-6  # KL: times posterior.kl() summed over tokens, averaged over the batch


class TokenizerLoss(nn.Module):
    """All tokenizer training losses, with the GAN schedule.
    Generator: w_rec * L2 + w_perc * perceptual + (w_q * quantizer | w_kl * KL) + [step >= start] w_gan * hinge_G
    Discriminator, from step `discriminator_start` on: hinge_D + w_lecam * LeCAM.
    The variant is read from the tokenizer's extras: "quantizer_loss" (VQ) or "posterior" (KL, a
    DiagonalGaussian with .kl() -> (B,)). All losses run in fp32, autocast off (as the official code):
    the GAN and perceptual terms are sums of small differences that bf16 would blur. state_dict()
    holds only D and the LeCAM EMAs; the frozen perceptual nets are rebuilt from torchvision."""

    def __init__(self, config: LossConfig, allow_download=True):
        super().__init__()
        self.config = c = config
        self.perceptual = (PerceptualLoss(c.perceptual, c.perceptual_pretrained, c.perceptual_on_logits,
                                          c.perceptual_resize, c.lpips_weights, allow_download)
                           if c.perceptual != "none" and c.perceptual_weight > 0 else None)  # fmt: skip
        self.discriminator = (PatchDiscriminator(3, c.disc_hidden, c.disc_stages, c.disc_blur_taps)
                              if c.discriminator_weight > 0 else None)
        self.lecam = LeCAM(c.lecam_decay)

    def discriminator_active(self, step):
        """Whether the GAN terms are on at this step (both players start together)."""
        return self.discriminator is not None and step >= self.config.discriminator_start

    def generator_loss(self, images, recon, extras, step):
        """images, recon: (B, 3, H, W) in [0, 1]; extras: the tokenizer's forward() dict.
        Returns (total scalar with graph, {name: detached scalar} for logging; weighted terms)."""
        c = self.config
        with torch.autocast(device_type=images.device.type, enabled=False):
            images, recon = images.float(), recon.float()
            logs = {"recon": c.reconstruction_weight * F.mse_loss(recon, images)}
            if self.perceptual is not None:
                perc, parts = self.perceptual(recon, images)
                logs["perceptual"] = c.perceptual_weight * perc
                if len(parts) > 1:  # unweighted components, to see what each contributes
                    logs.update({f"perceptual_{k}": v for k, v in parts.items()})
            if "quantizer_loss" in extras:  # VQ variant
                logs["quantizer"] = c.quantizer_weight * extras["quantizer_loss"].float()
                logs.update({k[:-5]: extras[k] for k in ("commitment_loss", "codebook_loss") if k in extras})
            elif "posterior" in extras:  # KL variant
                # Sum over tokens and channels, mean over the batch. The official also divides L2
                # by exp(logvar) with a frozen logvar = 0, i.e. by 1: omitted.
                logs["kl"] = c.kl_weight * extras["posterior"].kl().mean()
            else:
                raise KeyError("extras must hold 'quantizer_loss' (VQ tokenizer) or 'posterior' (KL tokenizer); "
                               f"got keys {sorted(extras)}. Pass the second output of TATiTok.forward().")
            if self.discriminator_active(step):
                # Freeze D for this pass: gradients flow through it into the reconstruction only.
                # (Call the plain module here, not a DDP wrapper of it.)
                self.discriminator.requires_grad_(False)
                logs["gan"] = c.discriminator_weight * hinge_g_loss(self.discriminator(recon))
            # The weighted terms, summed in this order (the unweighted parts above are for logging only).
            logs["total"] = total = sum(logs[k] for k in ("recon", "perceptual", "quantizer", "kl", "gan") if k in logs)
        return total, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(self, images, recon, step, discriminator=None):
        """One discriminator step's objective; before discriminator_active(step), a zero with no graph.
        discriminator: the DDP-wrapped one under torchrun (gradients averaged), else self.discriminator."""
        if not self.discriminator_active(step):
            return torch.zeros((), device=images.device), {}
        c = self.config
        D = discriminator if discriminator is not None else self.discriminator
        self.discriminator.requires_grad_(True)
        with torch.autocast(device_type=images.device.type, enabled=False):
            # recon is detached: this step trains D, not the tokenizer.
            real, fake = D(images.detach().float()), D(recon.detach().float())  # (B, 1, 16, 16) each
            hinge = hinge_d_loss(real, fake)
            real_mean, fake_mean = real.mean(), fake.mean()
            lecam = c.lecam_weight * self.lecam(real_mean, fake_mean) if c.lecam_weight > 0 else hinge * 0
            total = hinge + lecam
        if c.lecam_weight > 0:
            self.lecam.update(real_mean, fake_mean)  # after the loss: it used the previous EMAs
        logs = dict(disc_total=total, hinge=hinge, lecam=lecam, logits_real=real_mean, logits_fake=fake_mean,
                    ema_real=self.lecam.ema_real.clone(), ema_fake=self.lecam.ema_fake.clone())  # fmt: skip
        return total, {k: v.detach() for k, v in logs.items()}


# -----------------------------------------------------------------------------
# Presets.

PRESETS = {
    # The official TA-TiTok recipe (LPIPS + ConvNeXt-S; needs LPIPS' vgg.pth, see LPIPS).
    "official": LossConfig(),
    # The paper's text / MaskBit: ResNet-50 logits as the perceptual loss, otherwise official.
    "paper_resnet50": LossConfig(perceptual="resnet50"),
    # The shapes world on a CPU: no downloads, so no pretrained perceptual net; a small discriminator
    # that switches on late. KL weight 1e-7: beside L2 alone the official 1e-6 makes the posterior
    # noise as large as the spread of the means; at 1e-7 the means win and reconstructions are sharper.
    "shapes": LossConfig(perceptual="none", perceptual_weight=0.0, discriminator_start=3000, discriminator_weight=0.1,
                         disc_hidden=32, disc_stages=2, kl_weight=1e-7),  # fmt: skip
    # Tests: every code path, random weights, small inputs, the GAN on from step 2.
    "tiny": LossConfig(perceptual="resnet50", perceptual_pretrained=False, perceptual_resize=32, discriminator_start=2,
                       disc_hidden=32, disc_stages=2),  # fmt: skip
}
