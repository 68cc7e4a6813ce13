"""Load test for `comask serve`: N requests from C concurrent clients, latency percentiles.

    python -m comask.serve.loadtest --url http://127.0.0.1:8000 -n 200 -c 8
    python -m comask.serve.loadtest --weights model_final.pth -n 200 -c 8   # starts its own server
    python -m comask.serve.loadtest --soak --weights model_final.pth -n 500 -c 16  # memory soak

Each client thread keeps one HTTP connection open (as a real caller would) and posts the same
image; the latency is measured at the client, from sending the request to the parsed answer.
Exit status 1 if any request failed, so the script doubles as a check.

`--soak` starts `comask serve` in its own process (so that its memory is the server's alone), sends
images of mixed sizes (`--sizes`) and compares the server's resident memory after the first
`--warmup` requests with its memory at the end: exit status 1 on any error or on growth above
`--max-growth` percent (a leak per request shows as steady growth).
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

from comask.engine.runtime import parse_size


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


def rss_mb(pid: int) -> tuple[float, float]:
    """(resident, peak resident) MiB of process `pid`, from /proc (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024.0  # kB
    return fields["VmRSS"], fields["VmHWM"]


@contextlib.contextmanager
def server_process(weights: str | Path, device: str = "cpu", host: str = "127.0.0.1",
                   timeout: float = 180.0, log_path: str | Path | None = None) -> Iterator[tuple[str, int]]:
    """`python -m comask serve` on a free loopback port, in its own process -> (url, pid) once /health
    answers; terminated on exit."""
    import os
    import subprocess
    import tempfile

    import httpx

    port = free_port(host)
    log_file = open(log_path, "wb") if log_path else tempfile.TemporaryFile()  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "comask", "serve", "--weights", str(weights), "--host", host,
                             "--port", str(port), "--device", device], stdout=log_file, stderr=subprocess.STDOUT,
                            env=dict(os.environ))
    url = f"http://{host}:{port}"

    def log_tail() -> str:
        log_file.flush()
        log_file.seek(0)
        return log_file.read()[-3000:].decode(errors="replace")

    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"comask serve exited with {proc.returncode}: {log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"comask serve did not answer /health within {timeout:.0f} s: {log_tail()}")
            time.sleep(0.25)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()


def run_soak(url: str, images: list[bytes], pid: int, requests: int = 500, concurrency: int = 16,
             warmup: int = 50, score_thr: float = 0.5, timeout: float = 300.0,
             deadline_s: float | None = None) -> dict[str, Any]:
    """`requests` POST /predict calls from `concurrency` clients, request i sending `images[i % len]`;
    the server's (`pid`) resident memory is read after `warmup` answers and at the end.

    `deadline_s` bounds the run: requests not started by then are not sent (counted as `not_sent`).
    """
    import httpx

    lock = threading.Lock()
    statuses: Counter[str] = Counter()
    errors: list[str] = []
    latencies: list[float] = []
    state = {"next": 0, "done": 0, "rss_warm": None}
    t_start = time.perf_counter()

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=timeout) as client:
            while True:
                with lock:
                    late = deadline_s is not None and time.perf_counter() - t_start > deadline_s
                    if state["next"] >= requests or late:
                        return
                    i = state["next"]
                    state["next"] += 1
                t0 = time.perf_counter()
                try:
                    r = client.post("/predict", params={"score_thr": score_thr},
                                    files={"file": (f"soak{i}.png", images[i % len(images)], "image/png")})
                    body = r.json()
                    ok = r.status_code == 200 and isinstance(body.get("instances"), list)
                    status, err = str(r.status_code), None if ok else f"HTTP {r.status_code}: {str(body)[:200]}"
                except Exception as e:  # a refused/reset connection is a result to count, not a crash
                    status, err = type(e).__name__, f"{type(e).__name__}: {e}"
                with lock:
                    statuses[status] += 1
                    if err:
                        errors.append(err)
                    else:
                        latencies.append((time.perf_counter() - t0) * 1000.0)
                    state["done"] += 1
                    if state["done"] == warmup:
                        state["rss_warm"] = rss_mb(pid)[0]

    rss_start = rss_mb(pid)[0]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for f in [pool.submit(client_loop) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t_start
    rss_end, rss_peak = rss_mb(pid)
    warm = state["rss_warm"]
    return {
        "requests": requests, "sent": state["next"], "not_sent": requests - state["next"],
        "concurrency": concurrency, "images": len(images), "ok": len(latencies), "errors": len(errors),
        "error_samples": errors[:5], "status_counts": dict(statuses), "wall_s": round(wall, 1),
        "rss_mb": {"start": round(rss_start, 1), f"after_{warmup}": None if warm is None else round(warm, 1),
                   "end": round(rss_end, 1), "peak": round(rss_peak, 1)},
        "growth_pct": None if warm is None else round(100.0 * (rss_end - warm) / warm, 2),
        "latency_ms": {"p50": round(percentile(latencies, 50), 1), "p95": round(percentile(latencies, 95), 1),
                       "max": round(max(latencies), 1) if latencies else None},
    }


def soak_images(sizes: list[tuple[int, int]], variants: int = 3) -> list[bytes]:
    """PNGs of the given (h, w) sizes, `variants` different scenes each, interleaved by size."""
    return [png_bytes(synthetic_image(h, w, seed=v * 100 + k)) for v in range(variants)
            for k, (h, w) in enumerate(sizes)]


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
    p.add_argument("--soak", action="store_true",
                   help="memory soak: needs --weights; the server runs in its own process, images of --sizes")
    p.add_argument("--sizes", default="96x96,128x128,240x320,480x640,768x1024,1080x1920",
                   help="--soak: comma-separated HxW sizes, sent in turn")
    p.add_argument("--warmup", type=int, default=50, help="--soak: requests before the reference memory reading")
    p.add_argument("--max-growth", type=float, default=10.0, help="--soak: allowed memory growth after warm-up, %%")
    p.add_argument("--max-minutes", type=float, default=30.0, help="--soak: stop sending new requests after this")
    a = p.parse_args(argv)
    if a.soak:
        return _soak_main(a)

    if a.image:
        image = Path(a.image).read_bytes()
        desc = a.image
    else:
        h, w = parse_size(a.size)
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
    lat = stats["latency_ms"]
    _report(stats, a.json, [
        f"{stats['ok']}/{stats['requests']} ok, {stats['errors']} errors, concurrency {stats['concurrency']}, "
        f"{desc}, model {stats['model']} on {stats['device']}",
        f"latency ms: p50 {lat['p50']}  p95 {lat['p95']}  p99 {lat['p99']}  max {lat['max']}  "
        f"| server inference p50 {stats['server_inference_ms_p50']} ms "
        f"| {stats['throughput_rps']} req/s over {stats['wall_s']} s",
    ])
    return 0 if stats["errors"] == 0 else 1


def _report(stats: dict, as_json: bool, lines: list[str]) -> None:
    """One JSON line, or the summary lines and the sampled errors."""
    if as_json:
        print(json.dumps(stats))
        return
    for line in lines:
        print(line)
    for e in stats["error_samples"]:
        print("  error:", e)


def _soak_main(a: argparse.Namespace) -> int:
    if not a.weights:
        print("--soak needs --weights (the server is started in its own process)", file=sys.stderr)
        return 2
    sizes = [parse_size(s, "--sizes") for s in a.sizes.split(",") if s.strip()]
    images = soak_images(sizes)
    with server_process(a.weights, a.device) as (url, pid):
        stats = run_soak(url, images, pid, a.requests, a.concurrency, a.warmup, a.score_thr,
                         deadline_s=a.max_minutes * 60.0)
    stats.update({"sizes": [f"{h}x{w}" for h, w in sizes], "weights": str(a.weights), "max_growth_pct": a.max_growth})
    r, growth = stats["rss_mb"], stats["growth_pct"]
    _report(stats, a.json, [
        f"soak: {stats['ok']}/{stats['requests']} ok, {stats['errors']} errors, {stats['not_sent']} not sent, "
        f"concurrency {stats['concurrency']}, sizes {','.join(stats['sizes'])}, {stats['wall_s']} s",
        f"server RSS MiB: start {r['start']}, after {a.warmup} requests {r.get(f'after_{a.warmup}')}, "
        f"end {r['end']} ({'n/a' if growth is None else f'{growth:+.1f}%'}), peak {r['peak']}; "
        f"latency p50 {stats['latency_ms']['p50']} ms, p95 {stats['latency_ms']['p95']} ms",
    ])
    grew = stats["growth_pct"] is None or stats["growth_pct"] > a.max_growth
    return 0 if stats["errors"] == 0 and stats["not_sent"] == 0 and not grew else 1


if __name__ == "__main__":
    sys.exit(main())
