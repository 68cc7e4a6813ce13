"""`model.test.compile`: torch.compile of the static part (backbone + RPN head) at inference (issue 22)."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from comask.cli import main as cli_main
from comask.config import ConfigError, load_config
from comask.modeling.build import build_model
from comask.modeling.static_compile import STATIC_PART, compile_static_part, restore_eager

DEMO = "asset:comask_mnv3_shapes_demo.pth"


def test_compile_static_part_wraps_and_restores() -> None:
    """The static part is wrapped lazily (nothing compiles until called); restore_eager puts the modules back."""
    model = build_model(load_config("comask_r18_mfpn_shapes"), pretrained=False)
    before = {name: model.get_submodule(name) for name in STATIC_PART}
    eager = compile_static_part(model, "reduce-overhead")
    assert eager == before
    assert all(type(model.get_submodule(n)).__name__ == "OptimizedModule" for n in STATIC_PART)
    restore_eager(model, eager)
    assert all(model.get_submodule(n) is before[n] for n in STATIC_PART)
    assert compile_static_part(model, "eager") == {}
    assert all(model.get_submodule(n) is before[n] for n in STATIC_PART)


def test_unknown_mode_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="model.test.compile must be one of eager, default"):
        compile_static_part(torch.nn.Module(), "fast")
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (64, 48)).save(img)
    rc = cli_main(["predict", str(img), "--weights", DEMO, "--out", str(tmp_path / "o"), "--device", "cpu",
                   "--opts", "model.test.compile=fast"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.test.compile must be one of" in err and "Traceback" not in err


def _have_cpp_toolchain() -> bool:
    include = sysconfig.get_paths().get("include")
    return bool(shutil.which("g++") or shutil.which("c++")) and bool(include) and (Path(include) / "Python.h").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _have_cpp_toolchain(), reason="inductor's CPU backend needs a C++ compiler and Python.h")
def test_compiled_predictor_detects_the_same() -> None:
    """Predictor(opts=[model.test.compile=default]) on the CPU (inductor): the eager model's detections."""
    from comask.data import synth
    from comask.engine.predict import Predictor

    gen = synth.PRESETS["demo"]
    images = [synth.render_image(gen, 128, 5, "val", i)[0] for i in range(2)]
    eager = Predictor(DEMO, device="cpu", score_thr=0.0)
    compiled = Predictor(DEMO, device="cpu", score_thr=0.0, opts=["model.test.compile=default"])
    assert type(compiled.backend.model.backbone).__name__ == "OptimizedModule"
    for a, b in zip(compiled.predict_batch(images), eager.predict_batch(images)):
        assert len(a["scores"]) > 0 and (a["labels"] == b["labels"]).all()
        assert abs(a["scores"] - b["scores"]).max() < 1e-4
        assert abs(a["boxes"] - b["boxes"]).max() < 1e-2
        assert (a["masks"] == b["masks"]).mean() > 0.9999
