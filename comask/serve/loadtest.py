"""Load test for `comask serve`: N requests from C concurrent clients, latency percentiles.

    python -m comask.serve.loadtest --url http://127.0.0.1:8000 -n 200 -c 8
    python -m comask.serve.loadtest --weights model_final.pth -n 200 -c 8   # starts its own server

Each client thread keeps one HTTP connection open (as a real caller would) and posts the same
image; the latency is measured at the client, from sending the request to the parsed answer.
Exit status 1 if any request failed, so the script doubles as a check.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def synthetic_image(height: int = 128, width: int = 128, seed: int = 0) -> np.ndarray:
    """A few filled shapes on a soft gradient: something a shapes model can find, made without files."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = 90 + 60 * xx / max(width - 1, 1)
    img[..., 1] = 100 + 50 * yy / max(height - 1, 1)
    img[..., 2] = 120
    for k in range(4):
        color = rng.integers(30, 230, size=3)
        cy, cx = rng.integers(height // 6, height - height // 6), rng.integers(width // 6, width - width // 6)
        r = int(rng.integers(max(3, min(height, width) // 10), max(4, min(height, width) // 5)))
        if k % 2 == 0:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
        img[inside] = color
    return np.clip(img, 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def background_server(app: Any, host: str = "127.0.0.1", port: int | None = None,
                      timeout: float = 60.0) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a thread of this process; yields its base URL."""
    import uvicorn

    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="comask-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"server on {host}:{port} stopped during start-up")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"server on {host}:{port} did not start within {timeout:.0f} s")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def run_load(url: str, image: bytes, requests: int = 200, concurrency: int = 8,
             score_thr: float = 0.5, timeout: float = 120.0) -> dict[str, Any]:
    """Fire `requests` POST /predict calls from `concurrency` threads; return latency statistics."""
    import httpx

    lock = threading.Lock()
    latencies: list[float] = []
    server_ms: list[float] = []
    statuses: Counter[str] = Counter()
    errors: list[str] = []
    remaining = [requests]

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=timeout) as client:
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                t0 = time.perf_counter()
                try:
                    r = client.post("/predict", params={"score_thr": score_thr},
                                    files={"file": ("load.png", image, "image/png")})
                    body = r.json()
                    ok = r.status_code == 200 and isinstance(body.get("instances"), list)
                    dt = (time.perf_counter() - t0) * 1000.0
                    with lock:
                        statuses[str(r.status_code)] += 1
                        if ok:
                            latencies.append(dt)
                            server_ms.append(float(body.get("inference_ms", float("nan"))))
                        else:
                            errors.append(f"HTTP {r.status_code}: {str(body)[:200]}")
                except Exception as e:  # a refused/reset connection is a result to count, not a crash
                    with lock:
                        statuses[type(e).__name__] += 1
                        errors.append(f"{type(e).__name__}: {e}")

    t_start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for f in [pool.submit(client_loop) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t_start
    return {
        "requests": requests,
        "concurrency": concurrency,
        "ok": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:5],
        "status_counts": dict(statuses),
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(latencies) / wall, 2) if wall > 0 else None,
        "latency_ms": {
            "p50": round(percentile(latencies, 50), 1),
            "p95": round(percentile(latencies, 95), 1),
            "p99": round(percentile(latencies, 99), 1),
            "mean": round(float(np.mean(latencies)), 1) if latencies else None,
            "max": round(max(latencies), 1) if latencies else None,
        },
        "server_inference_ms_p50": round(percentile(server_ms, 50), 1),
    }


def _parse_size(s: str) -> tuple[int, int]:
    h, _, w = s.lower().partition("x")
    return int(h), int(w or h)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m comask.serve.loadtest", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    src.add_argument("--weights", help="checkpoint: start a server on a free loopback port first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-batch", type=int, default=None, help="with --weights: micro-batch size of the server")
    p.add_argument("-n", "--requests", type=int, default=200)
    p.add_argument("-c", "--concurrency", type=int, default=8)
    p.add_argument("--image", default=None, help="image file to send (default: a synthetic PNG)")
    p.add_argument("--size", default="128x128", help="HxW of the synthetic image")
    p.add_argument("--score-thr", type=float, default=0.5)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)

    if a.image:
        image = Path(a.image).read_bytes()
        desc = a.image
    else:
        h, w = _parse_size(a.size)
        image = png_bytes(synthetic_image(h, w))
        desc = f"synthetic {h}x{w} PNG"

    with contextlib.ExitStack() as stack:
        if a.weights:
            from comask.serve.app import ServeSettings, create_app, load_predictor

            predictor, info = load_predictor(a.weights, a.device)
            settings = ServeSettings()
            if a.max_batch is not None:
                settings.max_batch = a.max_batch
            url = stack.enter_context(background_server(create_app(predictor, info, settings)))
        else:
            url = a.url.rstrip("/")
        import httpx

        meta = httpx.get(f"{url}/metadata", timeout=30).json()
        stats = run_load(url, image, a.requests, a.concurrency, a.score_thr)
    stats.update({"image": desc, "url": url, "model": meta.get("config"), "device": meta.get("device"),
                  "max_batch": a.max_batch})
    if a.json:
        print(json.dumps(stats))
    else:
        lat = stats["latency_ms"]
        print(f"{stats['ok']}/{stats['requests']} ok, {stats['errors']} errors, concurrency {stats['concurrency']}, "
              f"{desc}, model {stats['model']} on {stats['device']}")
        print(f"latency ms: p50 {lat['p50']}  p95 {lat['p95']}  p99 {lat['p99']}  max {lat['max']}  "
              f"| server inference p50 {stats['server_inference_ms_p50']} ms "
              f"| {stats['throughput_rps']} req/s over {stats['wall_s']} s")
        for e in stats["error_samples"]:
            print("  error:", e)
    return 0 if stats["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
