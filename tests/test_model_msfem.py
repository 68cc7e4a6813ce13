"""MSFEM / MFPN: shapes, equivalence with the paper's concat formulation, the 1x1 stop rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from comask.modeling.backbone import build_resnet_fpn
from comask.modeling.msfem import MFPN, MSFEM


def _reference(m: MSFEM, x: torch.Tensor) -> torch.Tensor:
    """Eq. 1-7 written literally: chain, upsample, concat, 1x1 conv, attention, 3x3 conv."""
    feats, cur = [x], x
    for down in m.down:
        if cur.shape[-2] > 1 or cur.shape[-1] > 1:
            cur = down(cur)
        feats.append(F.interpolate(cur, size=x.shape[-2:], mode="bilinear", align_corners=False))
    ff = m.fuse(torch.cat(feats, dim=1))
    v2 = torch.sigmoid(m.fc2(torch.relu(m.fc1(ff.mean(dim=(2, 3))))))
    y = ff * v2[:, :, None, None]
    if m.out_norm is None:
        return m.out_conv(y)
    return torch.relu(y + m.out_norm(m.out_conv(y)))


@pytest.mark.parametrize("branches", [1, 2, 4])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("size", [(13, 19), (8, 8), (3, 5), (1, 1)])
def test_msfem_matches_literal_equations(branches, residual, size):
    torch.manual_seed(0)
    m = MSFEM(16, branches, residual=residual, reduction=4).eval()
    x = torch.randn(2, 16, *size)
    out = m(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, _reference(m, x), rtol=1e-4, atol=1e-5)
    if residual:
        assert (out >= 0).all()


def test_msfem_structure_follows_method():
    m = MSFEM(64, 4, residual=True, reduction=4)
    assert len(m.down) == 3
    conv = m.down[0][0]
    assert conv.stride == (2, 2) and conv.kernel_size == (3, 3)
    assert m.fuse.in_channels == 4 * 64 and m.fuse.out_channels == 64 and m.fuse.kernel_size == (1, 1)
    assert (m.fc1.in_features, m.fc1.out_features, m.fc2.out_features) == (64, 16, 64)
    assert m.out_conv.kernel_size == (3, 3) and m.out_conv.stride == (1, 1)
    assert m.down[0][1].num_groups == 16
    assert MSFEM(256, 2).down[0][1].num_groups == 32
    assert MSFEM(24, 2).down[0][1].num_groups == 6  # narrow widths: fewer groups, >= 4 channels each
    with pytest.raises(ValueError):
        MSFEM(16, 0)


def test_msfem_chain_stops_at_one_cell():
    torch.manual_seed(0)
    m = MSFEM(8, 4)
    x = torch.randn(1, 8, 2, 2, requires_grad=True)
    m(x).sum().backward()
    # 2x2 -> 1x1 after the first stride-2 conv; the other two convs never run
    assert m.down[0][0].weight.grad is not None
    assert m.down[1][0].weight.grad is None and m.down[2][0].weight.grad is None
    assert torch.isfinite(x.grad).all()


def test_msfem_attention_rescales_channels():
    torch.manual_seed(0)
    m = MSFEM(8, 1, residual=False).eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        m.fc2.bias.fill_(-1e4)  # sigmoid -> 0: every channel suppressed before the 3x3 conv
        out = m(x)
    expected = m.out_conv.bias[None, :, None, None].expand_as(out)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("branches", [1, 4])
def test_mfpn_levels_keys_and_shapes(branches):
    torch.manual_seed(0)
    fpn = build_resnet_fpn(18, out_channels=32, norm="bn", frozen_stages=0)
    mfpn = MFPN(fpn, branches).eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        plain = fpn(x)
        out = mfpn(x)
    assert list(out) == ["0", "1", "2", "3", "pool"] == list(plain)
    for k in out:
        assert out[k].shape == plain[k].shape
        assert out[k].shape[1] == 32
        assert torch.isfinite(out[k]).all()
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)]
    assert sorted(mfpn.msfem) == ["p2", "p3", "p4", "p5", "p6"]
    # separate weights per level
    assert mfpn.msfem["p2"].fuse.weight.data_ptr() != mfpn.msfem["p3"].fuse.weight.data_ptr()
    keys = set(mfpn.state_dict())
    assert "body.layer1.0.conv1.weight" in keys and "fpn.inner_blocks.0.0.weight" in keys
    assert "msfem.p6.fuse.weight" in keys


def test_msfem_channels_last_input():
    torch.manual_seed(0)
    m = MSFEM(16, 4).eval()
    x = torch.randn(2, 16, 10, 12)
    with torch.no_grad():
        a = m(x)
        b = m.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
