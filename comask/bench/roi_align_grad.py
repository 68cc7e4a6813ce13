"""Side-by-side benchmark of the RoIAlign backward: torchvision's CPU kernel against
`comask.modeling.roi_align` (separable products), on the same inputs in one process, alternating.

    comask bench roi-align [--config A] [--compare B] [--repeats N] [--threads T]

Prints, per config, the process CPU seconds of full SGD steps (forward, backward, update; shapes-bench
batch of `bench speed --train`) with each op, and the op-level backward alone on a P2-sized map.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch
from torchvision.ops import roi_align as tv_roi_align

import comask.modeling.heads as heads
from comask.modeling.roi_align import roi_align as fast_roi_align

OPS = {"torchvision": tv_roi_align, "comask": fast_roi_align}


def _cpu(fn: Callable[[], object]) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def op_times(rounds: int) -> dict[str, list[float]]:
    """Backward of one 14x14 pooling of 512 RoIs over 8 maps of 64 x 44 x 55 (a 176 x 220 batch's P2)."""
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(8, 64, 44, 55, generator=g, requires_grad=True)
    xy = torch.rand(512, 2, generator=g) * torch.tensor([220.0, 176.0])
    wh = 2 + torch.rand(512, 2, generator=g) * 60
    rois = torch.cat([torch.randint(0, 8, (512, 1), generator=g).float(), xy, xy + wh], 1)
    out = {k: [] for k in OPS}
    for _ in range(rounds):
        for name, op in OPS.items():
            y = op(feat, rois, (14, 14), 0.25, 2, True)
            grad = torch.ones_like(y)
            out[name].append(_cpu(partial(torch.autograd.grad, y, feat, grad)))
    return out


def step_times(config: str, rounds: int) -> dict[str, list[float]]:
    from comask.bench.speed import _train_batch
    from comask.config import load_config
    from comask.modeling import build_model

    cfg = load_config(config, ["runtime.load_from=null"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    images, targets = _train_batch(cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)

    def step() -> None:
        loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    out = {k: [] for k in OPS}
    installed = heads.roi_align
    try:
        for _ in range(rounds):
            for name, op in OPS.items():
                heads.roi_align = op  # both models pool through comask.modeling.heads.FPNRoIAlign
                out[name].append(_cpu(step))
    finally:
        heads.roi_align = installed
    return out


def _row(label: str, times: dict[str, list[float]]) -> str:
    tv, ours = min(times["torchvision"]), min(times["comask"])
    return f"| {label} | {tv:.3f} | {ours:.3f} | {tv / ours:.2f}x |"


def run(configs: list[str], rounds: int, threads: int) -> str:
    """The table (markdown) of `comask bench roi-align`; rows are printed as they are measured."""
    torch.set_num_threads(threads)
    lines = [
        f"threads {threads}, {rounds} alternating rounds, min process CPU seconds",
        "| what | torchvision backward | comask backward | speed-up |",
        "|---|---|---|---|",
        _row("RoIAlign backward alone, 512 RoIs 14x14 on 8x64x44x55", op_times(rounds)),
    ]
    print("\n".join(lines), flush=True)
    for config in configs:
        lines.append(_row(f"SGD step, {config}", step_times(config, rounds)))
        print(lines[-1], flush=True)
    return "\n".join(lines)
