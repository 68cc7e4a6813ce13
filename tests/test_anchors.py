"""CachedAnchorGenerator: the same anchors as torchvision's generator, built once per input size (issue 22)."""

from __future__ import annotations

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from comask.modeling.anchors import CACHE_SIZE, CachedAnchorGenerator

SIZES = ((32,), (64,), (128,), (256,), (512,))
RATIOS = ((0.5, 1.0, 2.0),) * 5


def _inputs(n: int, h: int, w: int) -> tuple[ImageList, list[torch.Tensor]]:
    images = ImageList(torch.zeros(n, 3, h, w), [(h - 3, w - 5)] * n)
    feats = [torch.zeros(n, 4, -(-h // s), -(-w // s)) for s in (4, 8, 16, 32, 64)]
    return images, feats


def test_same_anchors_as_torchvision_across_sizes_and_batches() -> None:
    cached, ref = CachedAnchorGenerator(SIZES, RATIOS), AnchorGenerator(SIZES, RATIOS)
    for n, h, w in [(1, 320, 480), (2, 320, 480), (3, 256, 352), (1, 320, 480)]:
        images, feats = _inputs(n, h, w)
        got, want = cached(images, feats), ref(images, feats)
        assert len(got) == len(want) == n
        for g, e in zip(got, want):
            assert torch.equal(g, e)
    # two sizes seen (the batch size is not part of the key)
    assert len(cached._cache) == 2


def test_second_call_builds_nothing_and_cache_is_bounded() -> None:
    gen = CachedAnchorGenerator(SIZES, RATIOS)
    images, feats = _inputs(1, 320, 480)
    first = gen(images, feats)[0]
    assert gen(images, feats)[0] is first  # reused, not rebuilt
    for i in range(CACHE_SIZE + 3):
        gen(*_inputs(1, 64 + 32 * i, 64))
    assert len(gen._cache) == CACHE_SIZE


def test_inference_mode_anchors_do_not_reach_training() -> None:
    """Anchors cached under inference_mode are kept apart: training afterwards gets ordinary tensors."""
    gen = CachedAnchorGenerator(SIZES, RATIOS)
    images, feats = _inputs(1, 128, 128)
    with torch.inference_mode():
        inf = gen(images, feats)[0]
    train = gen(images, feats)[0]
    assert inf.is_inference() and not train.is_inference()
    w = torch.ones(1, requires_grad=True)
    (train * w).sum().backward()  # an inference tensor here would raise
    assert w.grad is not None


def test_tracing_computes_anchors_from_the_input() -> None:
    """Under torch.jit.trace the cache is bypassed, so a traced graph does not hold one size's anchors as
    a constant taken from an earlier eager call."""
    gen = CachedAnchorGenerator(SIZES, RATIOS)
    images, feats = _inputs(1, 128, 128)
    gen(images, feats)

    def fn(x: torch.Tensor, *fs: torch.Tensor) -> torch.Tensor:
        return gen(ImageList(x, [(128, 128)]), list(fs))[0]

    traced = torch.jit.trace(fn, (images.tensors, *feats), check_trace=False)
    assert len(gen._cache) == 1  # tracing added nothing
    assert any(n.kind() == "aten::arange" for n in traced.graph.nodes())
