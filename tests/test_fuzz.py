"""Fuzzing untrusted inputs with hypothesis: mutated COCO annotation files and mutated image files.

Every command that reads them (`comask data check`, `train`'s start-up: the data set and the first
batch of its loader, `eval`'s data set, `comask predict`) must answer with a one-line UserError or a
counted skip: never another exception, a traceback or a hang (each example runs under an alarm).

Fixed seed (`derandomize=True`) and a bounded number of examples (COMASK_FUZZ_EXAMPLES, default 80
per test) so CI is repeatable and fast; a longer run is documented in docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TinyCoco, make_tiny_coco  # noqa: E402

from comask.errors import UserError  # noqa: E402

EXAMPLES = int(os.environ.get("COMASK_FUZZ_EXAMPLES", "80"))
ALARM_S = 60  # one example that runs this long is a hang
# shrinking a failure can take minutes; COMASK_FUZZ_SHRINK=1 asks for the minimal example
_PHASES = [Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("COMASK_FUZZ_SHRINK") else [])
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, phases=_PHASES,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
ASSET = Path(__file__).resolve().parents[1] / "comask" / "assets" / "comask_mnv3_shapes_demo.pth"


@contextlib.contextmanager
def _alarm(seconds: int = ALARM_S) -> Iterator[None]:
    def hang(*_: object) -> None:
        raise TimeoutError(f"no answer within {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _one_line(e: UserError) -> None:
    assert "\n" not in str(e) and "Traceback" not in str(e), repr(str(e))


# ---------------------------------------------------------------------------------------------------
# Annotation files
# ---------------------------------------------------------------------------------------------------

_ODD_TEXT = st.sampled_from(["", " ", "ü", "名前", "\u202eevil", "a\nb", "../x.png", "/etc/passwd", "\x00",
                             "\ud800", "x" * 300, "NaN", "1e400", "c.png", "0"])
_ODD_NUMBERS = st.one_of(st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 10**30, 2**64 + 1, 0.5, -0.0, 1e308,
                                          -1e308, 5e-324, float("nan"), float("inf"), float("-inf")]),
                         st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True))
_LEAF = st.one_of(st.none(), st.booleans(), _ODD_NUMBERS, _ODD_TEXT, st.text(max_size=8))
_VALUE = st.recursive(_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)
_OPS = ("replace", "delete", "wrap", "append", "duplicate", "nest", "scale")


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.extend(_paths(v, (*prefix, i)))
    return out


def _nested(depth: int) -> Any:
    v: Any = 1
    for _ in range(depth):
        v = [v]
    return v


def _mutate(data: dict, draw: Any) -> dict:
    """1-4 structural mutations at random places of the JSON tree."""
    data = copy.deepcopy(data)
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(data)
        path = paths[draw(st.integers(0, len(paths) - 1))]
        op = draw(st.sampled_from(_OPS))
        if not path:  # the root: replace the whole document's content
            if op == "delete":
                data = {k: v for k, v in data.items() if k != draw(st.sampled_from(sorted(data) or ["images"]))}
            continue
        parent = data
        for p in path[:-1]:
            parent = parent[p]
        key = path[-1]
        node = parent[key]
        if op == "replace":
            parent[key] = draw(_VALUE)
        elif op == "delete":
            del parent[key]
        elif op == "wrap":
            parent[key] = [node] if draw(st.booleans()) else {"value": node}
        elif op == "append" and isinstance(node, list):
            node.append(draw(_VALUE))
        elif op == "duplicate" and isinstance(node, list) and node:
            node.append(copy.deepcopy(node[draw(st.integers(0, len(node) - 1))]))
        elif op == "nest":
            parent[key] = _nested(draw(st.sampled_from([5, 50, 500])))
        elif op == "scale" and isinstance(node, (int, float)) and not isinstance(node, bool):
            parent[key] = node * draw(st.sampled_from([-1, 0, 1e6, 1e300, 2**40, float("nan")]))
    return data


def _encode(data: dict, draw: Any) -> bytes:
    """JSON text (NaN/Infinity allowed, as Python writes them), sometimes damaged as bytes."""
    raw = json.dumps(data).encode("utf-8", "surrogatepass")
    how = draw(st.sampled_from(["plain"] * 6 + ["truncate", "flip", "latin1", "deep"]))
    if how == "truncate":
        raw = raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    elif how == "flip" and raw:
        b = bytearray(raw)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << draw(st.integers(0, 7))
        raw = bytes(b)
    elif how == "latin1":
        raw = raw.replace(b'"', b'"\xe9', 1)
    elif how == "deep":
        raw = b"[" * 100_000 + b"]" * 100_000
    return raw


@pytest.fixture(scope="module", autouse=True)
def _memory_cap() -> Iterator[None]:
    """A runaway allocation (the fuzzer found a polygon coordinate of 1e9 that made pycocotools take
    16 GB) fails here as a MemoryError instead of exhausting the machine: data size capped at 3 GiB above
    what the process uses now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    status = Path("/proc/self/status")
    if not status.exists():
        yield
        return
    vm_data = next(int(ln.split()[1]) * 1024 for ln in status.read_text().splitlines() if ln.startswith("VmData:"))
    cap = vm_data + 3 * 2**30
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


@pytest.fixture(scope="module")
def base_coco(tmp_path_factory: pytest.TempPathFactory) -> TinyCoco:
    return make_tiny_coco(tmp_path_factory.mktemp("fuzz") / "base")


def _check_dataset_items(ds: Any, train: bool) -> None:
    for i in range(len(ds)):
        try:
            img, t = ds[i]
        except UserError as e:
            _one_line(e)
            return
        if img is None:
            assert not train and t.get("skipped")
            continue
        assert img.dtype == torch.float32 and img.ndim == 3 and img.shape[0] == 3
        n = len(t["labels"])
        assert t["boxes"].shape == (n, 4) and torch.isfinite(t["boxes"]).all()
        assert t["masks"].shape == (n, *img.shape[-2:])
        assert n == 0 or (int(t["labels"].min()) >= 1 and int(t["labels"].max()) <= len(ds.cat_ids))


def _answers_for_annotations(tc: TinyCoco, raw: bytes) -> None:
    from comask.cli import main
    from comask.data.coco import CocoDataset
    from comask.data.loader import build_dataset, build_train_loader

    tc.ann.write_bytes(raw)
    with _alarm():
        # comask data check: exit 0/1 with a report (text and JSON), never an exception
        for extra in ([], ["--json"]):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                rc = main(["data", "check", "--ann", str(tc.ann), "--images", str(tc.images), *extra])
            assert rc in (0, 1, 2), out.getvalue()[-500:]
            if extra and rc in (0, 1):
                report = json.loads(out.getvalue())
                for p in report["errors"] + report["warnings"]:
                    assert "\n" not in p["message"], p
        # train start-up (the data set and one batch of the loader as `train` builds them), and eval's data set
        from _train_helpers import tiny_cfg

        for skip in ("false", "true"):
            cfg = tiny_cfg(tc.root, f"data.train={{ann: {tc.ann}, images: {tc.images}}}", f"data.skip_bad={skip}",
                           "model.num_classes=3", "input.min_size_train=[32]", "input.max_size_train=48")
            try:
                ds = build_dataset(cfg, "train")
            except UserError as e:
                _one_line(e)
                event(f"train data set (skip_bad={skip}): refused")
            else:
                event(f"train data set (skip_bad={skip}): built, {'skips' if ds.skipped else 'no skips'}")
                _check_dataset_items(ds, train=True)
                try:
                    images, targets = next(iter(build_train_loader(cfg, ds)))
                    assert len(images) == len(targets) == int(cfg.schedule.ims_per_batch)
                except UserError as e:
                    _one_line(e)
            try:
                val = CocoDataset(tc.ann, tc.images, train=False, skip_bad=skip == "true")
            except UserError as e:
                _one_line(e)
            else:
                _check_dataset_items(val, train=False)


@FUZZ
@given(st.data())
def test_fuzz_annotation_files(base_coco: TinyCoco, tmp_path_factory: pytest.TempPathFactory,
                               data: st.DataObject) -> None:
    mutated = _mutate(base_coco.data, data.draw)
    raw = _encode(mutated, data.draw)
    root = tmp_path_factory.mktemp("ann")
    shutil.copytree(base_coco.images, root / "images")
    tc = TinyCoco(root=root, ann=root / "annotations.json", images=root / "images", data=mutated)
    _answers_for_annotations(tc, raw)


# ---------------------------------------------------------------------------------------------------
# Image files
# ---------------------------------------------------------------------------------------------------

_MODES = ["RGB", "L", "LA", "P", "PA", "RGBA", "1", "I", "I;16", "F", "CMYK", "YCbCr", "HSV", "LAB"]
_FORMATS = ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "ICO"]


@st.composite
def _image_bytes(draw: Any) -> tuple[bytes, str]:
    """A small image in an odd mode and format, then maybe truncated, bit-flipped or spliced."""
    mode, fmt = draw(st.sampled_from(_MODES)), draw(st.sampled_from(_FORMATS))
    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    with contextlib.suppress(ValueError, OSError):
        img = img.convert(mode)
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
        fmt = "PNG"
    raw = bytearray(buf.getvalue())
    # positions are drawn as fractions of the length: an encoder's output size may vary between runs,
    # and what hypothesis draws must not depend on it
    def pos(n: int) -> int:
        frac = draw(st.integers(0, 2**16 - 1)) / 2**16  # always drawn, whatever n is
        return max(0, min(n - 1, int(frac * n)))

    how = draw(st.sampled_from(["intact", "truncate", "flip", "flip", "splice", "header_only", "garbage"]))
    if how == "truncate":
        raw = raw[: pos(len(raw))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 16))):
            raw[pos(len(raw))] ^= 1 << draw(st.integers(0, 7))
    elif how == "splice":
        i = pos(len(raw) + 1)
        raw[i:i] = draw(st.binary(min_size=1, max_size=64))
    elif how == "header_only":
        raw = raw[: min(len(raw), draw(st.integers(8, 64)))]
    elif how == "garbage":
        raw = bytearray(draw(st.binary(max_size=256)))
    ext = {"JPEG": ".jpg", "TIFF": ".tif", "PPM": ".ppm", "ICO": ".ico"}.get(fmt, "." + fmt.lower())
    return bytes(raw), ext


@pytest.fixture(scope="module")
def predictor() -> Any:
    from comask.engine.predict import Predictor

    assert ASSET.is_file(), f"shipped demo checkpoint missing: {ASSET}"
    torch.set_num_threads(1)
    return Predictor(ASSET, device="cpu", score_thr=0.3)


@FUZZ
@given(st.lists(_image_bytes(), min_size=1, max_size=3))
def test_fuzz_image_files(base_coco: TinyCoco, predictor: Any, tmp_path_factory: pytest.TempPathFactory,
                          images: list[tuple[bytes, str]]) -> None:
    from comask.data.images import ImageFileError, probe_image, read_image
    from comask.engine.predict import predict_paths

    root = tmp_path_factory.mktemp("img")
    files = []
    for k, (raw, ext) in enumerate(images):
        f = root / f"in{k}{ext}"
        f.write_bytes(raw)
        files.append(f)
    sizes: list[tuple[int, int] | None] = []
    with _alarm():
        for f in files:
            size = None
            for call in (read_image, lambda p: probe_image(p, decode=True)):
                try:
                    out = call(f)
                except ImageFileError as e:
                    _one_line(e)
                    continue
                if isinstance(out, np.ndarray):
                    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
                    size = out.shape[:2]
            sizes.append(size)
        # predict: every input is predicted or skipped with one counted line
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = predict_paths([str(f) for f in files], root / "out", predictor=predictor, batch_size=2,
                                   draw=True)
            except UserError as e:
                _one_line(e)
                rc = None
        skipped = [ln for ln in err.getvalue().splitlines() if ln.startswith("comask: skipped")]
        if rc is not None:
            rows = json.loads((root / "out" / "predictions.json").read_text())
            assert rc == (1 if skipped else 0), err.getvalue()
            assert len({r["image_id"] for r in rows}) <= len(files) - len(skipped)
            assert all(math.isfinite(r["score"]) for r in rows)
        assert "Traceback" not in err.getvalue()
        # train start-up with a mutated image in the data set (its stored size kept): loaded or skipped
        tc = make_tiny_coco(root / "coco")
        shutil.copyfile(files[0], tc.image_path(1))
        if sizes[0] is not None:  # its real size, so that a decodable file is used rather than refused
            tc.data["images"][0].update(height=int(sizes[0][0]), width=int(sizes[0][1]))
            tc.data["annotations"] = [a for a in tc.data["annotations"] if a["image_id"] != 1]
        _answers_for_annotations(tc, json.dumps(tc.data).encode())


@pytest.mark.parametrize("name", ["a\nb.png", "\ud800.png", "a\x00.png", "tab\there.png"])
def test_file_names_that_cannot_name_a_file(tiny_coco: TinyCoco, name: str, capsys: pytest.CaptureFixture) -> None:
    """Found by the fuzzer: a lone surrogate or NUL crashed the header scan (ValueError from os.stat); a
    newline split the one-line messages. Such names are a bad image entry."""
    from comask.cli import main
    from comask.data.coco import CocoDataset
    from comask.data.images import ImageFileError, read_image

    tiny_coco.data["images"][0]["file_name"] = name
    tiny_coco.write()
    assert main(["data", "check", "--ann", str(tiny_coco.ann), "--images", str(tiny_coco.images), "--json"]) == 1
    errors = json.loads(capsys.readouterr().out)["errors"]
    assert [e["kind"] for e in errors] == ["bad_image_entry"] and "file_name" in errors[0]["message"]
    with pytest.raises(UserError, match="file_name") as ei:
        CocoDataset(tiny_coco.ann, tiny_coco.images, train=True)
    _one_line(ei.value)
    assert CocoDataset(tiny_coco.ann, tiny_coco.images, train=True, skip_bad=True).skipped == {"bad_image_entry": 1}
    if "\x00" in name or "\ud800" in name:
        with pytest.raises(ImageFileError, match="not a usable file name"):
            read_image(tiny_coco.images / name)


@pytest.mark.parametrize("field, value", [("image_id", [1]), ("id", {"a": 1}), ("segmentation", [[1, [2, 3]]]),
                                          ("segmentation", [[1, 2, 3, "x", 5, 6]]), ("bbox", [1, 2, 3, [4]])])
def test_malformed_annotation_values(tiny_coco: TinyCoco, field: str, value: Any,
                                     capsys: pytest.CaptureFixture) -> None:
    """Found by the fuzzer: a list-valued id (unhashable) or a ragged polygon crashed the scan."""
    from comask.cli import main
    from comask.data.coco import CocoDataset

    tiny_coco.data["annotations"][0][field] = value
    tiny_coco.write()
    assert main(["data", "check", "--ann", str(tiny_coco.ann), "--images", str(tiny_coco.images), "--json"]) == 1
    errors = json.loads(capsys.readouterr().out)["errors"]
    assert len(errors) == 1 and errors[0]["kind"] in ("bad_annotation_entry", "bad_segmentation", "bad_box")
    with pytest.raises(UserError) as ei:
        CocoDataset(tiny_coco.ann, tiny_coco.images, train=True)
    _one_line(ei.value)
    assert sum(CocoDataset(tiny_coco.ann, tiny_coco.images, train=True, skip_bad=True).skipped.values()) == 1


def test_far_polygons_and_corrupt_rle_strings(tiny_coco: TinyCoco, tmp_path: Path) -> None:
    """Found by the fuzzer: a polygon coordinate of 6e7 made rasterizing take 8 GB and NaN 16 GB
    (pycocotools walks every edge pixel by pixel), and pycocotools decodes a compressed RLE string
    whose runs exceed h*w past its buffer. Far polygons are clipped (the same pixels inside the image),
    bad RLE strings are a `bad_segmentation` error, and evaluation scores against the checked
    annotations, not the raw file."""
    import resource

    from comask.data.coco import CocoDataset
    from comask.data.transforms import rasterize_np
    from comask.engine.evaluate import _gt_coco

    ann = tiny_coco.data["annotations"]
    ann[0]["segmentation"] = [[5.0, 4.0, 6e9, 4.0, 25.0, 20.0, 5.0, 1e300]]  # image 1 (64x48)
    ann[2]["segmentation"] = [[8.0, 40.0, float("nan"), 40.0, 20.0, 10.0]]  # image 2
    ann[1]["segmentation"]["counts"] = ann[1]["segmentation"]["counts"][:-2] + "R5R5"  # runs past 48*64
    tiny_coco.write()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UserError, match=r"annotation 11 .*compressed RLE counts decodes to \d+ pixels, not 48\*64"):
        CocoDataset(tiny_coco.ann, tiny_coco.images, train=True)
    for train in (True, False):
        ds = CocoDataset(tiny_coco.ann, tiny_coco.images, train=train, skip_bad=True, min_sizes=(48,), max_size=64)
        assert ds.skipped == {"bad_segmentation": 1, "nan_coordinates": 1}
        for i in range(len(ds)):
            ds[i]
    gt = _gt_coco(ds)  # the evaluation data set's checked ground truth
    assert sorted(gt.anns) == [10, 40, 41]
    m = gt.annToMask(gt.anns[10])
    assert m.shape == (48, 64) and m[4:20, 5:25].all()
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 200  # MB
    poly = ds._records[ds.image_ids.index(1)]["anns"][0][2][0]
    assert max(abs(v) for v in poly) < 2000  # clipped
    assert rasterize_np([[poly]], (48, 64))[0].sum() == m.sum()
