"""The analytic FLOP counters (MFU in the trainers and bench.py): a hand count on the
tiny MaskGen, and equality with torch.utils.flop_counter on every tiny model."""

import pytest
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import maskgen as M
import tokenizer as T

L = 16  # text tokens


# On CPU, F.scaled_dot_product_attention runs aten._scaled_dot_product_flash_attention_for_cpu.
# Some torch releases (2.14) have no FLOP formula registered for that op, so the counter would
# see 0 FLOPs of attention; give it torch's own SDPA formula, the one it uses for the CUDA ops.
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_MISSING = {} if _CPU_SDPA in flop_counter.flop_registry else {
    _CPU_SDPA: lambda q, k, v, *args, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v)
}


def counted(fn):
    """FLOPs torch counts (matmuls, convolutions, SDPA) while fn() runs."""
    with FlopCounterMode(display=False, custom_mapping=_MISSING) as fc:
        fn()
    return fc.get_total_flops()


def test_maskgen_vq_hand_count():
    # tiny_vq: D=64, depth 2, N=16 tokens, V=64 codes, text 32 wide, pooled 32 + aesthetic 16.
    m = M.build(M.PRESETS["tiny_vq"])
    D, N, V, T_ = 64, 16, 64, 16 + L
    mm = lambda rows, k, n: 2 * rows * k * n  # noqa: E731  a (rows x k) @ (k x n) matmul
    condition = mm(L, 32, D) + mm(1, 32 + 16, D)  # text and pooled projections
    condition += 2 * mm(1, D, 6 * D)  # block 0: adaLN-Zero of both streams
    condition += mm(1, D, 6 * D) + mm(1, D, 2 * D)  # block 1: image adaLN-Zero, text AdaLNContinuous
    condition += mm(1, D, 2 * D)  # the final norm
    block0 = (
        4 * mm(T_, D, D)  # q, k, v, out on image + text tokens
        + 2 * (2 * T_ * T_ * D)  # QK^T and AV over the joint sequence
        + mm(T_, D, 4 * D) + mm(T_, 4 * D, D)  # MLPs
    )  # fmt: skip
    block1 = (
        4 * mm(N, D, D) + 2 * mm(L, D, D)  # image q/k/v/out, text k/v
        + 2 * (2 * N * T_ * D)  # image queries only
        + mm(N, D, 4 * D) + mm(N, 4 * D, D)  # image MLP
    )  # fmt: skip
    step = block0 + block1 + mm(N, D, V)  # + the LM head
    f = m.flops(L)
    assert f == {"condition": condition, "step": step, "diffloss_row": 0, "diffloss_time": 0, "diffloss_cond": 0}
    assert m.train_flops(L) == 3 * (condition + step)
    assert m.generate_flops(L, num_steps=8) == 2 * (condition + 8 * step)
    assert m.generate_flops(L, num_steps=8, guided=False) == condition + 8 * step


@pytest.mark.parametrize("preset", ["tiny", "tiny_kl", "shapes", "shapes_kl"])
def test_tokenizer_flops_match_torch(preset):
    torch.manual_seed(0)
    m = T.TATiTok(T.PRESETS[preset]).eval()
    c = m.config
    x = torch.rand(2, 3, c.image_size, c.image_size)
    text = torch.randn(2, c.text_context_length, c.text_embed_dim)
    f = m.flops()
    with torch.no_grad():
        assert counted(lambda: m.encode(x)) == 2 * f["encode"]
        tokens = m.encode(x)
        assert counted(lambda: m.decode(tokens, text)) == 2 * f["decode"]


@pytest.mark.parametrize("preset", ["tiny_vq", "tiny_kl"])
def test_maskgen_flops_match_torch(preset):
    torch.manual_seed(0)
    m = M.build(M.PRESETS[preset])
    c, B = m.config, 2
    text, pooled = torch.randn(B, L, c.text_width), torch.randn(B, c.pooled_dim)
    tokens = torch.randint(0, c.codebook_size, (B, c.num_tokens)) if c.mode == "vq" else torch.randn(
        B, c.num_tokens, c.token_size)  # fmt: skip
    f = m.flops(L)
    rows = c.diffusion_batch_mul * c.num_tokens if c.mode == "kl" else 0
    assert counted(lambda: m(tokens, text, pooled)) == B * (f["condition"] + f["step"] + rows * f["diffloss_row"])
    null_t, null_p = torch.zeros(1, L, c.text_width), torch.zeros(1, c.pooled_dim)
    with torch.no_grad():
        for guided in (True, False):
            g = c.guidance_scale if guided else 1.0
            n = counted(lambda: m.generate(text, pooled, null_t, null_p, guidance_scale=g))
            assert n == B * m.generate_flops(L, guided=guided, batch=B)
