"""Config loading: _base_ inheritance, overrides, validation, and every shipped config."""

from pathlib import Path

import pytest

import comask.modeling.build  # noqa: F401  (registers the model's checks with the config loader)
from comask.config import CONFIG_DIR, ConfigError, load_config

SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_shipped_configs_include_the_required_names():
    for name in ("comask_r50_mfpn_2x_coco", "comask_r101_mfpn_2x_coco", "maskrcnn_r50_fpn_2x_coco",
                 "comask_r18_mfpn_shapes", "maskrcnn_r18_fpn_shapes", "comask_r18_mfpn_demo"):
        assert name in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert cfg.model.type in ("comask", "maskrcnn")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_r101_is_a_one_line_change_from_r50():
    a = _flat(load_config("comask_r50_mfpn_2x_coco").to_dict())
    b = _flat(load_config("comask_r101_mfpn_2x_coco").to_dict())
    assert {k for k in a if a[k] != b.get(k)} == {"model.backbone.depth", "name"}


def test_baseline_differs_from_comask_only_in_the_method():
    a = _flat(load_config("comask_r18_mfpn_shapes").to_dict())
    b = _flat(load_config("maskrcnn_r18_fpn_shapes").to_dict())
    assert {k for k in a if a[k] != b.get(k)} == {"model.type", "model.msfem.branches", "name"}


def test_overrides_parse_yaml_values_and_reach_nested_keys():
    cfg = load_config("comask_r50_mfpn_2x_coco", ["model.msfem.branches=2", "schedule.steps=[10, 20]",
                                                  "model.collab_head.collaborative=false", "runtime.amp=null"])
    assert cfg.model.msfem.branches == 2
    assert cfg.schedule.steps == [10, 20]
    assert cfg.model.collab_head.collaborative is False
    assert cfg.runtime.amp is None


@pytest.mark.parametrize("override, needle", [
    ("model.msfem.brnches=2", "unknown key 'model.msfem.brnches'"),
    ("model.nothere.x=1", "'model.nothere' is not a section"),
    ("noequals", "must look like key.sub=value"),
    ("model.msfem.branches=9", "model.msfem.branches must be 0..6"),
    ("model.type=yolo", "model.type must be"),
    ("model.msfem.fusion_init=zeros", "model.msfem.fusion_init must be one of kaiming, identity"),
    ("model.msfem.placement=before", "model.msfem.placement must be one of in_fpn, after_fpn"),
    ("model.backbone.depth=20", "model.backbone.depth must be one of 18/34/50/101/152"),
    ("model.backbone.norm=ln", "model.backbone.norm must be one of"),
])
def test_bad_overrides_are_one_line_errors(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("comask_r50_mfpn_2x_coco", [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_user_file_inherits_builtin_by_name_and_overrides(tmp_path: Path):
    f = tmp_path / "mine.yaml"
    f.write_text("_base_: comask_r50_mfpn_2x_coco.yaml\nmodel:\n  num_classes: 3\n")
    cfg = load_config(f)
    assert cfg.model.num_classes == 3
    assert cfg.model.backbone.depth == 50  # inherited
    assert cfg.name == "mine"


def test_base_chain_merges_in_order_and_delete_replaces(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("_base_: comask_r50_mfpn_2x_coco.yaml\nmodel: {fpn: {channels: 64}}\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\nmodel: {fpn: {channels: 32}}\n")
    assert load_config(tmp_path / "b.yaml").model.fpn.channels == 32
    (tmp_path / "c.yaml").write_text(
        "_base_: a.yaml\ndata: {_delete_: true, train: {ann: x, images: y}, val: {ann: x, images: y}}\n")
    assert set(load_config(tmp_path / "c.yaml").data) == {"train", "val"}


def test_missing_cycle_and_bad_yaml_are_clear(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config")
    (tmp_path / "x.yaml").write_text("_base_: y.yaml\n")
    (tmp_path / "y.yaml").write_text("_base_: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "x.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "nobase.yaml").write_text("_base_: missing.yaml\n")
    with pytest.raises(ConfigError, match="neither a file"):
        load_config(tmp_path / "nobase.yaml")
