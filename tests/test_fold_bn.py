"""BatchNorm folded into the convolutions of an inference model: same outputs up to rounding, fewer ops."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet50
from torchvision.ops.misc import FrozenBatchNorm2d

from comask.modeling.fold_bn import fold_batch_norms

DEMO = "asset:comask_mnv3_shapes_demo.pth"


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial statistics, so a fold that dropped or misplaced the affine map would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                n = m.running_mean.numel()
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def _assert_close_to_scale(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Rounding-level agreement relative to the output's scale: random deep nets reach large values, where an
    elementwise tolerance would depend on the thread count's summation order."""
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, err


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in model.modules())


def test_resnet50_frozen_bn_folds_every_norm() -> None:
    model = resnet50(weights=None, norm_layer=FrozenBatchNorm2d).eval()
    _randomise_norms(model)
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        assert fold_batch_norms(model) == 53 and _norms(model) == 0
        out = model(x)
    _assert_close_to_scale(out, ref)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("conv1.weight"))


def test_mobilenet_v3_running_stats_bn_folds() -> None:
    model = mobilenet_v3_large(weights=None).features.eval()  # BatchNorm2d inside Conv2dNormActivation
    _randomise_norms(model)
    before = _norms(model)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
        assert fold_batch_norms(model) == before > 0 and _norms(model) == 0
        out = model(x)
    _assert_close_to_scale(out, ref)


def test_norm_not_after_a_conv_is_left_alone() -> None:
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    assert fold_batch_norms(model) == 0 and _norms(model) == 2


def test_demo_checkpoint_folded_predicts_the_same() -> None:
    """`load_model` folds by default (model.test.fold_bn); the detections equal the unfolded model's."""
    from comask.data import synth
    from comask.engine.predict import load_model

    folded = load_model(DEMO).model
    plain = load_model(DEMO, opts=["model.test.fold_bn=false"]).model
    assert _norms(folded) == 0 and _norms(plain) > 0
    gen = synth.PRESETS["demo"]
    images = [torch.from_numpy(synth.render_image(gen, 128, 5, "val", i)[0]).permute(2, 0, 1).float() / 255
              for i in range(3)]
    with torch.inference_mode():
        for a, b in zip(folded(images), plain(images)):
            assert a["boxes"].shape[0] > 0 and torch.equal(a["labels"], b["labels"])
            torch.testing.assert_close(a["scores"], b["scores"], atol=1e-4, rtol=0)
            torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-2, rtol=0)
            agree = ((a["masks"] > 0.5) == (b["masks"] > 0.5)).float().mean().item()
            assert agree > 0.9999, agree


def test_bench_speed_compares_a_config_with_itself_unfolded() -> None:
    """`--compare-opts` changes the B model only: the folded A runs fewer operators per image than B."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "comask", "bench", "speed", "--config", "comask_r18_mfpn_shapes", "--compare",
         "comask_r18_mfpn_shapes", "--compare-opts", "model.test.fold_bn=false", "--size", "64x96",
         "--threads", "1", "--repeats", "1", "--warmup", "0", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = json.loads(proc.stdout.strip().splitlines()[-1])["models"]
    assert a["folded_bn"] > 0 and b["folded_bn"] == 0
    assert b["label"] == "comask_r18_mfpn_shapes (model.test.fold_bn=false)"
    assert a["syncs"]["ops"] < b["syncs"]["ops"]


def test_compare_opts_without_compare_is_refused() -> None:
    from comask.cli import main

    assert main(["bench", "speed", "--config", "comask_r18_mfpn_shapes", "--compare-opts", "a=1"]) != 0
