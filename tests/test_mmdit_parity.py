"""Our MM-DiT JointBlock / AdaLNContinuous against diffusers' (which the official MaskGen
uses), with identical random weights. Skipped when diffusers is not installed."""

import pytest
import torch

diffusers_attention = pytest.importorskip("diffusers.models.attention")
diffusers_norm = pytest.importorskip("diffusers.models.normalization")

from maskgen import BLOCK_RENAMES, AdaLNContinuous, JointBlock, _rename, split_qkv  # noqa: E402

D, HEADS, N, L = 64, 4, 10, 7


def randomise(module, seed):
    # Random values everywhere: zero-initialised maps would hide ordering bugs.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("pre_only", [False, True])
def test_joint_block_matches_diffusers(pre_only):
    ref = diffusers_attention.JointTransformerBlock(D, HEADS, D // HEADS, context_pre_only=pre_only).eval()
    randomise(ref, seed=int(pre_only))
    ours = JointBlock(D, HEADS, txt_pre_only=pre_only).eval()
    sd = {_rename(k, BLOCK_RENAMES): v for k, v in ref.state_dict().items()}
    if pre_only:  # its text queries are unused; we do not hold them
        assert sd.pop("attn.txt_q.weight") is not None and sd.pop("attn.txt_q.bias") is not None
    assert None not in sd
    view = split_qkv(ours.state_dict())  # our fused q|k|v rows, seen as diffusers' separate to_q/to_k/to_v
    assert view.keys() == sd.keys()  # a strict load: every tensor on both sides has its partner
    with torch.no_grad():
        for k, v in sd.items():
            view[k].copy_(v)

    g = torch.Generator().manual_seed(2)
    img, txt, cond = torch.randn(2, N, D, generator=g), torch.randn(2, L, D, generator=g), torch.randn(2, D, generator=g)
    with torch.no_grad():
        ref_txt, ref_img = ref(img, txt, cond)  # diffusers returns (context, hidden)
        our_img, our_txt = ours(img, txt, cond)
    torch.testing.assert_close(our_img, ref_img, rtol=0, atol=1e-5)
    if pre_only:
        assert ref_txt is None and our_txt is None
    else:
        torch.testing.assert_close(our_txt, ref_txt, rtol=0, atol=1e-5)


def test_final_norm_matches_diffusers():
    ref = diffusers_norm.AdaLayerNormContinuous(D, D, elementwise_affine=False, eps=1e-6)
    randomise(ref, seed=3)
    ours = AdaLNContinuous(D)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, cond = torch.randn(2, N, D), torch.randn(2, D)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, cond), ref(x, cond), rtol=0, atol=1e-5)
