"""
The schedules of masked generation: how many tokens are masked in training, how many
each decoding step fills in, and how classifier-free guidance ramps over the steps.

Paper: "Democratizing Text-to-Image Masked Generative Models with Compact
Text-Aware One-Dimensional Tokens" (Kim et al., arXiv 2501.07730), §3 and §4.2, Tab. 8:
"masked tokens are sampled by randomly selecting the masking rate from [0, 1] on a
cosine schedule, following MaskGIT". MaskGen-VQ decodes as MaskGIT (confidence-based,
arccos schedule), MaskGen-KL as MAR (random order, cosine schedule); the numbers follow
the official inference code, including its float32 rounding.

Every per-step count is computed in Python before the decoding loop, so the loop has
static shapes and no host syncs (maskgen.py's generate runs under torch.compile).

    arccos_mask_rate(u)              training masking rate for progress u in [0, 1]
    vq_mask_schedule(K, N)           VQ: tokens still masked after each of N steps
    kl_draw_schedule(K, N)           KL: which slice of the random order each step draws
    vq_guidance_scale(...), kl_guidance_scale(...)   the guidance weight at a step
    check_guidance_schedule(mode, name)              the ramps each variant knows
    gumbel(shape, generator, device)                 Gumbel noise for MaskGIT's sampling
"""

import math

import torch

# The classifier-free guidance ramps each variant's sampler knows (official inference code).
GUIDANCE_SCHEDULES = {"vq": ("cosine", "linear", "none"), "kl": ("linear", "constant")}


def check_guidance_schedule(mode, schedule, name="guidance_schedule"):
    if schedule not in GUIDANCE_SCHEDULES[mode]:
        raise ValueError(
            f"{name} {schedule!r} is not available for MaskGen-{mode.upper()}; choose one of {GUIDANCE_SCHEDULES[mode]}"
        )


def gumbel(shape, generator, device):
    """Gumbel(0, 1) noise -log(-log(u)), with the official clamps (1e-20) so u = 0 cannot give inf."""
    u = torch.rand(shape, generator=generator, device=device)
    return -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))


def arccos_mask_rate(u):
    """The "arccos" masking schedule: rate = acos(u) / (pi/2) for progress u in [0, 1].

    With u ~ U(0, 1) its mean is 2/pi ~ 0.64, so training sees mostly heavy masking;
    during sampling u = step / steps gives few tokens early and many late.
    """
    return torch.acos(u) / (math.pi * 0.5)


def vq_mask_schedule(num_tokens, num_steps):
    """How many tokens stay masked after each VQ decoding step (a Python list).

    The official computes floor(K * arccos_rate(ratio)) in float32 on the device and
    clamps it to [1, (tokens masked now) - 1] using the first sample's count; every
    sample has the same count, so doing it once here in Python (in float32, for the
    same rounding) gives the same numbers without a host sync in the loop.
    """
    counts, masked = [], num_tokens
    for step in range(num_steps):
        rate = arccos_mask_rate(torch.tensor((step + 1) / num_steps))  # float32, as official
        masked = max(1, min(masked - 1, int(torch.floor(num_tokens * rate))))
        counts.append(masked)
    return counts


def kl_draw_schedule(num_tokens, num_steps):
    """MaskGen-KL's (MAR's) cosine schedule, as Python ints: one (lo, hi, left) per step
    that draws tokens. Positions order[:, :hi] are masked before the step, which draws
    order[:, lo:hi]; `left` = floor(K cos(pi/2 (s+1)/N)), kept in [1, hi - 1], sets the
    guidance ramp. The last step draws everything still masked (lo = 0); with N > K some
    steps would draw nothing and are left out."""
    K, N, masked, draws = num_tokens, num_steps, num_tokens, []
    for step in range(N):
        left = max(1, min(masked - 1, math.floor(K * math.cos(math.pi / 2 * (step + 1) / N))))
        lo = 0 if step == N - 1 else left
        if masked - lo > 0:
            draws.append((lo, masked, left))
            masked = lo
    return draws


def vq_guidance_scale(scale, schedule, ratio, power=1.0):
    """The VQ guidance weight s at step ratio (step + 1) / steps, official schedules.

    "cosine" (MDT) ramps s from ~1 at the first step to `scale` at the last, in float32
    as the official computes it (so guided logits match bit for bit); "linear" ramps
    linearly; "none" keeps `scale`.
    """
    if schedule == "none":
        return scale
    if schedule == "linear":
        return ratio * (scale - 1) + 1
    p = torch.ones(1) * power
    ramp = (1 - torch.cos((ratio**p) * torch.pi)) * 1 / 2
    return float(((scale - 1) * ramp + 1)[0])


def kl_guidance_scale(scale, schedule, num_tokens, left):
    """The KL guidance weight at a step that leaves `left` of K tokens masked (MAR):
    "linear" ramps 1 + (scale - 1) (K - left) / K, "constant" keeps `scale`."""
    return 1 + (scale - 1) * (num_tokens - left) / num_tokens if schedule == "linear" else scale
