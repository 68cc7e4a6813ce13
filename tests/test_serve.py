"""`comask serve`: HTTP API tests on a real (tiny, random) CoMask checkpoint, limits and failures,
queueing, and a short load test on loopback. The browser test is in test_serve_browser.py."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import warnings

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from comask.serve.app import ServeSettings, create_app, load_predictor
from comask.serve.loadtest import background_server, png_bytes, run_load, synthetic_image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

CLASSES = ["circle", "square", "triangle"]
# CoMask from the built-in R50 config, shrunk so one 128 px image takes a fraction of a second on
# a CPU; the model head's own score threshold is 0 so that random weights still yield detections.
TINY_OVERRIDES = [
    "model.backbone.weights=null",
    "model.num_classes=3", "model.backbone.depth=18", "model.backbone.norm=bn", "model.backbone.frozen_stages=0",
    "model.fpn.channels=32", "model.rpn.anchor_sizes=[8,16,32,64,128]", "model.rpn.pre_nms_top_n_test=100",
    "model.rpn.post_nms_top_n_test=50", "model.box_head.fc_dim=64", "model.collab_head.conv_dim=32",
    "model.collab_head.num_convs=2", "model.test.detections_per_img=20", "model.test.score_thresh=0.0",
    "input.min_size_test=128", "input.max_size_test=192",
]


def make_tiny_checkpoint(path) -> str:
    """A real checkpoint in the DESIGN.md layout: random CoMask weights, config, class meta."""
    from comask.config import load_config
    from comask.engine.checkpoint import save_checkpoint
    from comask.modeling.build import build_model

    cfg = load_config("comask_r50_mfpn_2x_coco", TINY_OVERRIDES)
    torch.manual_seed(0)
    model = build_model(cfg)
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "iter": 0,
                     "meta": {"classes": CLASSES, "cat_ids": [11, 12, 13]}}, path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny.pth")


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    return load_predictor(tiny_ckpt, "cpu")


@pytest.fixture(scope="module")
def client(loaded):
    with TestClient(create_app(*loaded)) as c:
        yield c


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return synthetic_image(96, 128, seed=3)


def post_png(client, data: bytes, params=None, name="x.png", ctype="image/png"):
    return client.post("/predict", params=params or {}, files={"file": (name, data, ctype)})


def test_predict_returns_the_models_instances_as_coco_rows(client, loaded, image):
    r = post_png(client, png_bytes(image), {"score_thr": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] == {"width": 128, "height": 96}
    assert body["time_ms"] > 0 and body["batch_size"] == 1
    rows = body["instances"]
    # The service must return exactly what the model finds for the same pixels.
    predictor, _ = loaded
    ref = predictor(image)
    assert len(rows) == len(ref["scores"]) > 0
    scores = [d["score"] for d in rows]
    assert scores == sorted(scores, reverse=True)
    order = np.argsort(-ref["scores"], kind="stable")
    for d, k in zip(rows, order):
        assert d["class_name"] in CLASSES and d["category_id"] == 11 + CLASSES.index(d["class_name"])
        assert d["score"] == pytest.approx(float(ref["scores"][k]), abs=1e-4)
        x1, y1, x2, y2 = ref["boxes"][k]
        assert d["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.01)
        seg = d["segmentation"]
        assert seg["size"] == [96, 128] and isinstance(seg["counts"], str)
        decoded = mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
        assert np.array_equal(decoded, ref["masks"][k])
        assert d["area"] == int(decoded.sum())


def test_score_threshold_and_max_det_filter(client, image):
    data = png_bytes(image)
    everything = post_png(client, data, {"score_thr": 0}).json()["instances"]
    assert len(everything) > 3
    assert len(post_png(client, data, {"score_thr": 0, "max_det": 3}).json()["instances"]) == 3
    mid = float(np.median([d["score"] for d in everything]))
    kept = post_png(client, data, {"score_thr": mid}).json()["instances"]
    assert 0 < len(kept) < len(everything) and all(d["score"] >= mid for d in kept)
    r = post_png(client, data, {"score_thr": 1.5})
    assert r.status_code == 422 and "score_thr" in r.json()["error"]


def test_raw_jpeg_body_and_rgba_png_are_accepted(client, image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    r = client.post("/predict", content=buf.getvalue(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["image"] == {"width": 128, "height": 96}
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    r = post_png(client, png_bytes(rgba))
    assert r.status_code == 200


def test_wrong_content_type_is_415(client):
    r = post_png(client, b"hello", name="notes.txt", ctype="text/plain")
    assert r.status_code == 415 and "text/plain" in r.json()["error"]
    r = client.post("/predict", json={"image": "x"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]


def test_corrupt_or_missing_image_is_400(client, image):
    r = post_png(client, b"\x89PNG\r\n\x1a\nnot really a png")
    assert r.status_code == 400 and "decode" in r.json()["error"]
    truncated = png_bytes(synthetic_image(64, 64))[:150]
    r = post_png(client, truncated)
    assert r.status_code == 400 and "error" in r.json()
    r = client.post("/predict", files={"other": ("x.png", png_bytes(image), "image/png")})
    assert r.status_code == 400 and "'file'" in r.json()["error"]
    r = post_png(client, b"")
    assert r.status_code == 400


def test_upload_size_and_pixel_limits(loaded, image):
    settings = ServeSettings(max_upload_bytes=20_000, max_pixels=100 * 100)
    with TestClient(create_app(*loaded, settings=settings)) as c:
        big = np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)  # noise: PNG ~43 kB
        r = post_png(c, png_bytes(big))
        assert r.status_code == 413 and "20000 bytes" in r.json()["error"]

        # Without a Content-Length header (chunked upload) the body is counted while it streams in.
        def chunks():
            for _ in range(10):
                yield b"\0" * 4096
        r = c.post("/predict", content=chunks(), headers={"content-type": "image/png"})
        assert r.status_code == 413

        # A small file that decodes to too many pixels is refused before decoding.
        flat = np.zeros((200, 200, 3), np.uint8)
        r = post_png(c, png_bytes(flat))
        assert r.status_code == 413 and "200x200" in r.json()["error"]
        assert post_png(c, png_bytes(image[:90, :100])).status_code == 200


def test_health_and_metadata(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model_loaded"] is True and h["worker_alive"] is True
    m = client.get("/metadata").json()
    assert m["classes"] == CLASSES and m["category_ids"] == [11, 12, 13]
    assert m["config"] == "comask_r50_mfpn_2x_coco" and m["model_type"] == "comask"
    assert m["input_size"] == {"min_size_test": 128, "max_size_test": 192}
    assert m["version"] and m["device"] == "cpu" and m["weights"] == "tiny.pth"
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("app.js", "rle.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert client.get("/missing").json() == {"error": "Not Found"}
    assert "/predict" in client.get("/openapi.json").json()["paths"]


class _Exploding:
    classes = CLASSES

    def __call__(self, image):
        raise RuntimeError("secret internal detail /srv/models/x.pth")


def test_internal_errors_are_500_without_traceback(caplog, image):
    with TestClient(create_app(_Exploding()), raise_server_exceptions=False) as c:
        with caplog.at_level(logging.ERROR, logger="comask.serve"):
            r = post_png(c, png_bytes(image))
        assert r.status_code == 500
        body = r.json()
        assert body["error"].startswith("internal server error (reference ")
        assert "secret" not in r.text and "Traceback" not in r.text
        # ... while the server log keeps the full story under the same reference.
        ref = body["error"].split("reference ")[1].rstrip(")")
        logged = "\n".join(rec.getMessage() + str(rec.exc_info) for rec in caplog.records)
        assert ref in logged and "secret internal detail" in logged
        # and the process keeps serving
        assert c.get("/health").json()["failed"] == 1


class _Gated:
    """A predictor that blocks until released: makes queueing observable."""

    classes = CLASSES

    def __init__(self, inner):
        self.inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, image):
        self.entered.set()
        assert self.gate.wait(30)
        return self.inner(image)


def test_full_queue_answers_503_and_recovers(loaded, image):
    import httpx

    gated = _Gated(loaded[0])
    app = create_app(gated, settings=ServeSettings(max_queue=1))
    data = png_bytes(image)
    with background_server(app) as url:
        first: dict = {}
        t = threading.Thread(target=lambda: first.update(r=httpx.post(
            f"{url}/predict", files={"file": ("a.png", data, "image/png")}, timeout=60)))
        t.start()
        assert gated.entered.wait(30)
        r = httpx.post(f"{url}/predict", files={"file": ("b.png", data, "image/png")}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["error"]
        gated.gate.set()
        t.join(60)
        assert first["r"].status_code == 200
        assert httpx.get(f"{url}/health").json()["queue"] == 0


def test_concurrent_requests_are_batched_and_match_single_runs(loaded, image):
    """8 clients at once on the real model: all succeed, micro-batches form, and a batched answer
    equals the answer for the same image alone."""
    import httpx

    gated = _Gated(loaded[0])
    gated.predict_batch = lambda images: (gated.gate.wait(30), loaded[0].predict_batch(images))[1]
    app = create_app(gated, settings=ServeSettings(max_batch=4))
    imgs = [synthetic_image(96, 128, seed=s) for s in range(8)]
    with background_server(app) as url:
        results: list = [None] * 8

        def go(i):
            results[i] = httpx.post(f"{url}/predict", params={"score_thr": 0},
                                    files={"file": ("a.png", png_bytes(imgs[i]), "image/png")}, timeout=120)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
        threads[0].start()
        assert gated.entered.wait(30)  # the first request holds the model ...
        for t in threads[1:]:
            t.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").json()["queue"] < 8 and time.monotonic() < deadline:
            time.sleep(0.05)  # ... while the other 7 queue up behind it
        gated.gate.set()
        for t in threads:
            t.join(120)
        health = httpx.get(f"{url}/health").json()
    assert [r.status_code for r in results] == [200] * 8
    sizes = [r.json()["batch_size"] for r in results]
    assert max(sizes) == 4 and health["served"] == 8 and health["batches"] < 8
    alone = loaded[0](imgs[5])
    got = results[5].json()["instances"]
    assert len(got) == len(alone["scores"])
    assert [d["score"] for d in got] == pytest.approx(sorted(alone["scores"].tolist(), reverse=True), abs=1e-3)


def test_load_on_loopback_has_no_errors(loaded):
    app = create_app(*loaded)
    with background_server(app) as url:
        stats = run_load(url, png_bytes(synthetic_image(96, 96)), requests=24, concurrency=8)
    assert stats["errors"] == 0 and stats["ok"] == 24, json.dumps(stats)
    assert 0 < stats["latency_ms"]["p50"] <= stats["latency_ms"]["p95"]


# ---------------------------------------------------------------------------------------------
# End to end: `comask serve` in its own process, driven by headless Chromium.

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def served(tiny_ckpt, tmp_path_factory):
    """`python -m comask serve` on a free loopback port; yields its URL once /health answers."""
    import os
    import subprocess
    import sys

    import httpx

    from comask.serve.loadtest import free_port

    port = free_port()
    log_path = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "comask", "serve", "--weights", tiny_ckpt, "--host", "127.0.0.1",
             "--port", str(port), "--device", "cpu"], stdout=log_file, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"comask serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"comask serve did not answer /health in 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -15), log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    import os

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"the browser test needs Debian's chromium and chromedriver, missing: {', '.join(missing)}; "
                    "install them with `apt-get install -y chromium chromium-driver` (as .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tmp_path_factory.mktemp("chromium-profile")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1280,900", "--force-device-scale-factor=1"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


CANVAS_SUM = "const c = document.getElementById('overlay');" \
    "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;" \
    "let s = 0; for (let i = 0; i < d.length; i++) s += d[i] * ((i % 7) + 1); return s;"


def test_browser_upload_draws_overlay_and_instance_list(served, browser, tmp_path):
    import httpx
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    img = synthetic_image(120, 160, seed=7)
    path = tmp_path / "shapes.png"
    path.write_bytes(png_bytes(img))
    expected = httpx.post(f"{served}/predict", params={"score_thr": 0, "max_det": 100},
                          files={"file": ("s.png", path.read_bytes(), "image/png")}, timeout=60).json()["instances"]
    assert len(expected) > 2

    d = browser
    d.get(f"{served}/?score=0")
    WebDriverWait(d, 30).until(lambda d: "classes" in d.find_element(By.ID, "model-info").text)
    assert "comask_r50_mfpn_2x_coco" in d.find_element(By.ID, "model-info").text
    d.find_element(By.ID, "file-input").send_keys(str(path))
    WebDriverWait(d, 90).until(lambda d: d.execute_script("return document.body.dataset.state") in ("done", "error"))
    assert d.execute_script("return document.body.dataset.state") == "done", d.find_element(By.ID, "error").text

    # The instance list shows every instance the server found, best first.
    rows = d.find_elements(By.CSS_SELECTOR, "#instance-rows tr")
    assert len(rows) == len(expected)
    assert rows[0].find_elements(By.TAG_NAME, "td")[2].text == expected[0]["class_name"]
    canvas = d.find_element(By.ID, "overlay")
    assert canvas.get_attribute("data-drawn") == str(len(expected))
    assert canvas.size["width"] > 0 and canvas.size["height"] > 0

    # The overlay is really drawn: the canvas changes when masks and boxes are switched off.
    with_overlay = d.execute_script(CANVAS_SUM)
    d.find_element(By.ID, "show-masks").click()
    d.find_element(By.ID, "show-boxes").click()
    plain = d.execute_script(CANVAS_SUM)
    assert plain > 0 and plain != with_overlay
    d.find_element(By.ID, "show-masks").click()
    d.find_element(By.ID, "show-boxes").click()
    assert d.execute_script(CANVAS_SUM) == with_overlay

    # The page's RLE decoder agrees with pycocotools on every mask.
    decoded = d.execute_script(
        "return window.comask.instances.map(d => { const o = []; "
        "d.mask.forEach((v, i) => { if (v) o.push(i); }); return [d.segmentation, o]; });")
    assert sum(len(ix) for _, ix in decoded) > 0
    for seg, ones in decoded:
        ref = mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()})
        assert ones == np.flatnonzero(ref).tolist()

    # Hovering a row highlights that instance on the canvas.
    ActionChains(d).move_to_element(rows[1]).perform()
    WebDriverWait(d, 5).until(lambda d: canvas.get_attribute("data-highlight") == "1")
    assert "active" in rows[1].get_attribute("class")
    assert d.execute_script(CANVAS_SUM) != with_overlay
    ActionChains(d).move_to_element(d.find_element(By.TAG_NAME, "h1")).perform()
    WebDriverWait(d, 5).until(lambda d: canvas.get_attribute("data-highlight") == "")

    # The score slider filters in the page, without asking the server again.
    served_before = httpx.get(f"{served}/health").json()["served"]
    mid = sorted(e["score"] for e in expected)[len(expected) // 2]
    set_slider = ("const s = document.getElementById('score-slider'); s.value = arguments[0];"
                  "s.dispatchEvent(new Event('input'));")
    d.execute_script(set_slider, str(mid))
    want = sum(e["score"] >= float(d.execute_script("return document.getElementById('score-slider').value"))
               for e in expected)
    assert 0 < want < len(expected)
    assert canvas.get_attribute("data-drawn") == str(want)
    assert len([r for r in rows if r.is_displayed()]) == want
    d.execute_script(set_slider, "1")
    assert canvas.get_attribute("data-drawn") == "0" and not any(r.is_displayed() for r in rows)
    assert d.find_element(By.ID, "empty").is_displayed()
    assert httpx.get(f"{served}/health").json()["served"] == served_before

    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_browser_shows_server_errors(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    browser.get(f"{served}/")
    browser.find_element(By.ID, "file-input").send_keys(str(bad))
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.dataset.state") == "error")
    assert "could not decode" in browser.find_element(By.ID, "error").text


def test_cli_serve_reports_a_missing_checkpoint(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "comask", "serve", "--weights", str(tmp_path / "nope.pth")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "nope.pth: checkpoint not found" in r.stderr and "Traceback" not in r.stderr


def test_decode_image_uses_the_data_readers_rules():
    """Uploads go through comask.data.images: 16-bit PNGs are scaled (not clipped), EXIF orientation is
    applied, and the side limit is checked from the header."""
    from comask.serve.app import ApiError, decode_image

    settings = ServeSettings(max_pixels=10_000, max_side=80)
    deep = np.full((10, 20), 65535, np.uint16)
    deep[:, :10] = 32768
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    rgb = decode_image(buf.getvalue(), settings)
    assert rgb.shape == (10, 20, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [127] * 3 and rgb[0, -1].tolist() == [255] * 3

    img = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed as 10 wide, 30 high
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue(), settings).shape == (30, 10, 3)

    with pytest.raises(ApiError) as e:
        decode_image(png_bytes(np.zeros((5, 90, 3), np.uint8)), settings)  # 450 pixels, but 90 px wide
    assert e.value.status == 413 and "90x5 pixels" in e.value.message
    for bad, words in ((b"", "empty upload"), (b"GIF89a garbage", "could not decode")):
        with pytest.raises(ApiError) as e:
            decode_image(bad, settings)
        assert e.value.status == 400 and words in e.value.message
