"""MSFEM and its placements (in_fpn, after_fpn / MFPN): shapes, equivalence with the paper's concat
formulation, the 1x1 stop rule, state-dict layouts, configs without the placement key."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comask.config import ConfigError, config_from_dict, load_config
from comask.modeling.backbone import build_resnet_fpn
from comask.modeling.build import build_backbone, build_model
from comask.modeling.msfem import MFPN, MSFEM, PLACEMENTS, msfem_in_fpn, msfem_levels


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
    if residual and size != (1, 1):
        # the residual form ends in a ReLU: some outputs are cut to exactly 0, others pass
        assert (out == 0).any() and (out > 0).any()


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


def test_msfem_gradients_match_literal_equations():
    """The in-place accumulation in forward() must leave autograd's result unchanged."""
    torch.manual_seed(0)
    # float64: the two computations sum in different orders, and float32 rounding of a gradient entry
    # of ~0.06 differed by 3e-5 in one element (a flake at rtol 1e-4), which would hide no real bug
    m = MSFEM(8, 3).double()
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    m(x1).square().sum().backward()
    got = [x1.grad] + [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    _reference(m, x2).square().sum().backward()
    want = [x2.grad] + [p.grad for p in m.parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def _tiny_fpn(seed: int = 0):
    torch.manual_seed(seed)
    return build_resnet_fpn(18, out_channels=16, norm="bn", frozen_stages=0)


@pytest.mark.parametrize("branches", [1, 2, 4])
def test_in_fpn_msfems_are_the_fpn_output_convs(branches):
    plain = _tiny_fpn().eval()
    net = msfem_in_fpn(_tiny_fpn(), branches).eval()
    assert all(isinstance(b, MSFEM) and b.branches == branches for b in net.fpn.layer_blocks)
    assert len(net.fpn.layer_blocks) == 4  # P2..P5; P6 has no module of its own
    # the shared part (ResNet, lateral 1x1 convs) is untouched: same seed, same weights
    assert torch.equal(net.fpn.inner_blocks[2][0].weight, plain.fpn.inner_blocks[2][0].weight)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        out = net(x)
        ref = plain(x)
        # recompute the pyramid by hand: lateral convs + nearest top-down sums, then one MSFEM each
        c = list(net.body(x).values())
        inner = [net.fpn.inner_blocks[i](c[i]) for i in range(4)]
        for i in (2, 1, 0):
            inner[i] = inner[i] + F.interpolate(inner[i + 1], size=inner[i].shape[-2:], mode="nearest")
        expect = [net.fpn.layer_blocks[i](inner[i]) for i in range(4)]
    assert list(out) == ["0", "1", "2", "3", "pool"] == list(ref)
    assert [tuple(v.shape) for v in out.values()] == [tuple(v.shape) for v in ref.values()]
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)]
    for i, key in enumerate(["0", "1", "2", "3"]):
        torch.testing.assert_close(out[key], expect[i], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(out[key], ref[key])  # the MSFEM, not the 3x3 conv, made it
    # P6 is the max-pool (kernel 1, stride 2) of the MSFEM'd P5, as in the authors' code
    torch.testing.assert_close(out["pool"], out["3"][:, :, ::2, ::2], rtol=0, atol=0)


def test_in_fpn_state_dict_keys_are_torchvision_layout():
    net = msfem_in_fpn(_tiny_fpn(), 2)
    keys = set(net.state_dict())
    assert "body.layer1.0.conv1.weight" in keys and "fpn.inner_blocks.3.0.weight" in keys
    assert {"fpn.layer_blocks.0.fuse.weight", "fpn.layer_blocks.3.out_conv.weight",
            "fpn.layer_blocks.1.down.0.0.weight"} <= keys
    # no leftovers of the replaced 3x3 convs, no MFPN-style names
    assert not any(k.startswith("fpn.layer_blocks.") and k.split(".")[3] in ("weight", "bias") for k in keys)
    assert not any(k.startswith("msfem.") for k in keys)
    assert not any(".layer_blocks.4" in k for k in keys)
    assert list(msfem_levels(net)) == ["p2", "p3", "p4", "p5"]
    assert msfem_levels(net)["p3"] == ("fpn.layer_blocks.1", net.fpn.layer_blocks[1])
    assert list(msfem_levels(MFPN(_tiny_fpn(), 1))) == ["p2", "p3", "p4", "p5", "p6"]
    assert msfem_levels(_tiny_fpn()) == {}


def _cfg(*opts: str):
    return load_config("comask_r18_mfpn_shapes", [
        "model.fpn.channels=16", "model.collab_head.conv_dim=16", "model.box_head.fc_dim=32",
        "model.rpn.pre_nms_top_n_test=50", "model.rpn.post_nms_top_n_test=20", "model.test.detections_per_img=10",
        "input.min_size_test=64", "input.max_size_test=96", *opts,
    ])


@pytest.mark.parametrize("branches", [0, 1, 2, 4])
def test_build_backbone_placements(branches):
    inside = build_backbone(_cfg(f"model.msfem.branches={branches}"))
    after = build_backbone(_cfg(f"model.msfem.branches={branches}", "model.msfem.placement=after_fpn"))
    if branches == 0:  # plain FPN whatever the placement: the baseline's exact layout
        for net in (inside, after):
            assert not isinstance(net, MFPN) and msfem_levels(net) == {}
            assert all(isinstance(b[0], nn.Conv2d) and b[0].kernel_size == (3, 3) for b in net.fpn.layer_blocks)
        assert set(inside.state_dict()) == set(after.state_dict())
        return
    assert [m.branches for _, m in msfem_levels(inside).values()] == [branches] * 4
    assert isinstance(after, MFPN) and [m.branches for _, m in msfem_levels(after).values()] == [branches] * 5
    # in_fpn: 4 MSFEMs instead of 4 3x3 convs; after_fpn: 5 MSFEMs on top of them
    n_in = sum(p.numel() for p in inside.parameters())
    n_after = sum(p.numel() for p in after.parameters())
    msfem_params = sum(p.numel() for p in MSFEM(16, branches).parameters())
    conv_params = 16 * 16 * 9 + 16
    assert n_after - n_in == msfem_params + 4 * conv_params


def test_default_placement_and_bad_value():
    assert load_config("comask_r50_mfpn_2x_coco").model.msfem.placement == "in_fpn"
    assert load_config("comask_r18_mfpn_shapes").model.msfem.placement == "in_fpn"
    with pytest.raises(ConfigError, match="model.msfem.placement"):
        build_backbone(_cfg("model.msfem.placement=inside"))


def test_checkpoint_config_without_placement_loads_as_after_fpn():
    """Checkpoints saved before the key existed hold an MFPN state dict and a config without it."""
    torch.manual_seed(0)
    old_cfg = _cfg("model.msfem.branches=1", "model.msfem.placement=after_fpn").to_dict()
    old = build_model(config_from_dict(old_cfg), pretrained=False).eval()
    saved = copy.deepcopy(old_cfg)
    del saved["model"]["msfem"]["placement"]
    again = build_model(config_from_dict(saved), pretrained=False).eval()
    again.load_state_dict(old.state_dict())  # strict: same keys and shapes
    assert isinstance(again.backbone, MFPN)
    image = [torch.rand(3, 64, 80)]
    with torch.no_grad():
        a, b = old(image)[0], again(image)[0]
    torch.testing.assert_close(a["boxes"], b["boxes"])
    # ... and such a state dict does not fit the new default: a loud error, never a silent mismatch
    with pytest.raises(RuntimeError, match="layer_blocks"):
        build_model(_cfg("model.msfem.branches=1"), pretrained=False).load_state_dict(old.state_dict())


def test_in_fpn_detector_trains_every_parameter():
    torch.manual_seed(0)
    model = build_model(_cfg("model.msfem.branches=2"), pretrained=False).train()
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
    masks = torch.zeros(2, 128, 128, dtype=torch.uint8)
    masks[0, 10:60, 20:90] = 1
    masks[1, 2:126, 4:124] = 1  # a big object, so the coarse levels get RPN gradient too
    target = {"boxes": torch.tensor([[20.0, 10, 90, 60], [4, 2, 124, 126]]), "labels": torch.tensor([1, 2]),
              "masks": masks}
    losses = model(images, [target, target])
    sum(losses.values()).backward()
    # at 128 px P5 is 4x4 -> 2x2 with B=2: every chain conv runs, so every parameter gets a gradient
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.backbone.fpn.layer_blocks[0].down[0][0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 96)])[0]
    assert out["masks"].shape[1:] == (1, 64, 96) and out["boxes"].shape[0] <= 10


def test_in_fpn_init_from_torchvision_layout(tmp_path):
    """A torchvision-layout Mask R-CNN file fills body, laterals and RPN; its FPN 3x3 output convs have
    no counterpart in the in_fpn model (the MSFEMs replace them) and are reported as unused."""
    from comask.modeling.pretrained import init_from_torchvision_maskrcnn

    torch.manual_seed(0)
    baseline = build_model(_cfg("model.type=maskrcnn", "model.msfem.branches=0"), pretrained=False)
    path = tmp_path / "mrcnn.pth"
    torch.save(baseline.state_dict(), path)
    model = build_model(_cfg("model.msfem.branches=1"), pretrained=False)
    report = init_from_torchvision_maskrcnn(model, path)
    own = model.state_dict()
    src = baseline.state_dict()
    for k in ("backbone.body.layer2.0.conv1.weight", "backbone.fpn.inner_blocks.0.0.weight", "rpn.head.cls_logits.bias"):
        assert torch.equal(own[k], src[k]), k
    assert {f"backbone.fpn.layer_blocks.{i}.0.{t}" for i in range(4) for t in ("weight", "bias")} <= set(
        report.unexpected
    )
    assert "backbone.fpn.layer_blocks.0.fuse.weight" in report.missing
    assert report.shape_mismatch == []


def test_identity_fusion_starts_as_the_output_conv_on_the_attended_input():
    """fusion_init=identity: F_f = F at step 0, so the module is conv3x3(F * V2) (eq. 7 form); the coarser
    branches' fusion weights get a gradient on the first step and open from there."""
    torch.manual_seed(0)
    m = MSFEM(8, 4, residual=False, fusion_init="identity")
    x = torch.randn(2, 8, 12, 10)
    att = torch.sigmoid(m.fc2(F.relu(m.fc1(x.mean(dim=(2, 3))))))
    expected = m.out_conv(x * att[:, :, None, None])
    out = m(x)
    assert torch.allclose(out, expected, atol=1e-5)
    out.square().sum().backward()
    w = m.fuse.weight.grad
    assert w[:, 8:].abs().sum() > 0  # the coarse branches' slices move on the first step
    assert m.down[0][0].weight.grad.abs().sum() == 0  # their convs wait until those slices are non-zero
    # the default (Kaiming) fusion mixes the branches from the start
    torch.manual_seed(0)
    k = MSFEM(8, 4, residual=False)
    k_att = torch.sigmoid(k.fc2(F.relu(k.fc1(x.mean(dim=(2, 3))))))
    assert not torch.allclose(k(x), k.out_conv(x * k_att[:, :, None, None]), atol=1e-3)
    with pytest.raises(ValueError, match="fusion_init"):
        MSFEM(8, 2, fusion_init="zeros")


def test_fusion_init_is_a_config_key_for_both_placements():
    for placement in PLACEMENTS:
        opts = [f"model.msfem.placement={placement}", "model.msfem.fusion_init=identity"]
        levels = msfem_levels(build_backbone(load_config("comask_r18_mfpn_shapes", opts))).values()
        assert levels and all(torch.equal(m.fuse.weight[:, : m.channels, 0, 0], torch.eye(m.channels)) for _, m in levels)
    with pytest.raises(ConfigError, match="fusion_init"):
        load_config("comask_r18_mfpn_shapes", ["model.msfem.fusion_init=zero"])


def test_bf16_backward_on_one_pixel_wide_maps_is_finite():
    # CPU oneDNN bf16 convolutions return garbage weight gradients for inputs one pixel wide (NaN in about
    # half of random draws before the float32 fallback); 8 draws at 256 channels, as at P6 of a 128 px image
    torch.manual_seed(0)
    m = MSFEM(256, 4, residual=True)
    for size in [(8, 2), (4, 1), (1, 1), (16, 1)]:
        for _ in range(2):
            m.zero_grad()
            x = torch.randn(2, 256, *size, requires_grad=True)
            with torch.autocast("cpu", torch.bfloat16):
                y = m(x)
            y.float().square().mean().backward()
            assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None), size
            assert torch.isfinite(x.grad).all(), size
