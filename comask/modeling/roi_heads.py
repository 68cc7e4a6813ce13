"""CoMask's RoI stage: classification head + collaborative head, with torchvision RoIHeads' interface.

Training: sampled RoIs -> classification CE; jittered positives -> collaborative head -> IoU loss on
the dense offsets and BCE on the ground-truth class's coarse mask.
Test: class scores on the proposals -> per-class score filter and NMS -> top detections -> one pass of
the collaborative head on the detections (offsets + predicted-class mask -> M_s -> voted box) -> per-class
NMS again on the voted boxes -> a second RoIAlign on the kept boxes -> the same head -> the class's 28x28
mask. Every step runs on all RoIs of the batch at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
from torchvision.ops import batched_nms, nms

from comask.modeling.collab_head import CollaborativeHead, fg_confidence
from comask.modeling.heads import ClassificationHead, FPNRoIAlign
from comask.modeling.losses import classification_loss, mask_loss, offset_loss
from comask.modeling.sync import host_list
from comask.modeling.targets import add_gt_proposals, collab_targets, sample_proposals
from comask.modeling.voting import clamp_boxes, vote_boxes


def nms_per_class(boxes: Tensor, scores: Tensor, classes: Tensor, iou_thresh: float) -> Tensor:
    """NMS within each class, in one NMS call (torchvision's coordinate trick: each class's boxes are shifted
    past every other class's), whatever the number of boxes; kept indices, best score first."""
    if torch.jit.is_tracing():  # torchvision's scripted version of the same: an export may see no boxes
        return batched_nms(boxes, scores, classes, iou_thresh)
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    shift = classes.to(boxes) * (boxes.max() + 1)
    return nms(boxes + shift[:, None], scores, iou_thresh)


def class_nms(
    boxes: Tensor, scores: Tensor, score_thresh: float, nms_thresh: float, max_det: int, top_k: int = 1000
) -> tuple[Tensor, Tensor]:
    """Per-class NMS of every (box, class) pair, all classes in one NMS call: the best `max_det` survivors.

    boxes (P, 4) shared by all classes; scores (P, C). Returns the kept pairs' flat indices p * C + c
    (best first) and their scores. Pairs scoring <= `score_thresh` or on boxes under 0.01 px are out.

    Only the `top_k` best pairs (at least 10 x max_det) go through NMS. That is exact: whether a pair
    survives greedy NMS depends only on the pairs that score higher, so the survivors among the best k
    pairs are the first survivors overall, and when at least `max_det` of them survive they are the whole
    answer; otherwise (or if the k-th pair is still valid) k grows and NMS runs again.
    Host reads: one (the number of survivors and whether k was enough) per NMS run, besides the NMS.
    """
    p, c = scores.shape
    if p * c == 0:
        return torch.zeros(0, dtype=torch.int64, device=scores.device), scores.new_zeros(0)
    small = (boxes[:, 2] - boxes[:, 0] < 1e-2) | (boxes[:, 3] - boxes[:, 1] < 1e-2)
    valid = (scores > score_thresh) & ~small[:, None]
    # invalid pairs sort last and can only suppress one another; they are cut off below
    if torch.jit.is_tracing():
        # export: the valid pairs through one NMS, no host read (the graph must not freeze this image's counts)
        idx = torch.where(valid.reshape(-1))[0]
        keep = batched_nms(boxes[idx // c], scores.reshape(-1)[idx], idx % c + 1, nms_thresh)[:max_det]
        return idx[keep], scores.reshape(-1)[idx[keep]]
    flat = torch.where(valid, scores, torch.full_like(scores, -1.0)).reshape(-1)
    k = min(p * c, max(top_k, 10 * max_det))
    while True:
        top, idx = flat.topk(k, sorted=True)
        ok = top > -1.0
        # invalid pairs get an empty box at 0, so that the class shift depends on the valid boxes alone
        cand = torch.where(ok[:, None], boxes[idx // c], torch.zeros_like(boxes[:1]))
        keep = nms_per_class(cand, top, idx % c + 1, nms_thresh)[:max_det]
        counts = host_list(torch.stack([ok[keep].sum(), ok[-1].to(torch.int64)]))
        n_kept, kth_valid = counts
        if n_kept == max_det or not kth_valid or k == p * c:
            return idx[keep[:n_kept]], top[keep[:n_kept]]
        k = min(p * c, 4 * k)


class CoMaskRoIHeads(nn.Module):
    # keyword groups, one per line: head sizes; proposal sampling; losses; the vote; test-time selection
    def __init__(
        self, in_channels: int, num_classes: int, *,
        fc_dim: int = 1024, conv_dim: int = 256, num_convs: int = 9, mask_skip: bool = False, sampling_ratio: int = 2,
        batch_size_per_image: int = 512, positive_fraction: float = 0.25, fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5, jitter: float = 0.15, max_pos_per_image: int = 192,
        cls_loss_weight: float = 2.0, offset_loss_weight: float = 2.0, mask_loss_weight: float = 1.0,
        vote_thresh: float = 0.5, collaborative: bool = True,
        score_thresh: float = 0.05, nms_thresh: float = 0.5, nms_after_vote: bool = True, detections_per_img: int = 100,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.cls_pooler = FPNRoIAlign(7, sampling_ratio)
        self.cls_head = ClassificationHead(in_channels, num_classes, fc_dim, 7)
        self.collab_pooler = FPNRoIAlign(14, sampling_ratio)
        self.collab_head = CollaborativeHead(in_channels, num_classes, conv_dim, num_convs, mask_skip)
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.jitter, self.max_pos_per_image = jitter, max_pos_per_image
        self.cls_loss_weight, self.offset_loss_weight = cls_loss_weight, offset_loss_weight
        self.mask_loss_weight = mask_loss_weight
        self.vote_thresh, self.collaborative = vote_thresh, collaborative
        self.score_thresh, self.nms_thresh, self.nms_after_vote = score_thresh, nms_thresh, nms_after_vote
        self.detections_per_img = detections_per_img
        # Exporters set this: ONNX Runtime cannot reshape an empty tensor to a shape with a -1 entry, which
        # the exported GroupNorm and head reshapes become, so an image without detections would fail there.
        # With it, each image gets one dummy RoI in the two inference passes, removed after; every op of
        # the head works on each RoI alone, so the dummy changes no other result.
        self.pad_rois = False

    # ---------------------------------------------------------------- training
    @staticmethod
    def _check_targets(targets: list[dict[str, Tensor]] | None, n_images: int) -> list[dict[str, Tensor]]:
        if targets is None or len(targets) != n_images:
            raise ValueError("CoMaskRoIHeads: training needs one target dict per image")
        for t in targets:
            for key in ("boxes", "labels", "masks"):
                if key not in t:
                    raise ValueError(f"CoMaskRoIHeads: target is missing '{key}'")
            if not t["boxes"].is_floating_point():
                raise TypeError("CoMaskRoIHeads: target boxes must be a float tensor")
        return targets

    def _losses(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        proposals = [p.detach() for p in proposals]
        cls_t = sample_proposals(
            add_gt_proposals(proposals, targets), targets, self.proposal_matcher, self.fg_bg_sampler
        )
        logits = self.cls_head(self.cls_pooler(features, cls_t.proposals, image_shapes))
        col_t = collab_targets(cls_t, targets, image_shapes, self.jitter, self.max_pos_per_image)
        x = self.collab_pooler(features, col_t.rois, image_shapes)
        offsets, masks = self.collab_head(x, col_t.labels)
        return {
            "loss_cls": classification_loss(logits, cls_t.labels) * self.cls_loss_weight,
            "loss_offset": offset_loss(offsets, col_t.offsets, col_t.masks) * self.offset_loss_weight,
            "loss_mask": mask_loss(masks, col_t.masks) * self.mask_loss_weight,
        }

    # ---------------------------------------------------------------- inference
    def _detect(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per image: boxes (N, 4) (the proposals' boxes), scores (N,), labels (N,) after filtering and NMS."""
        logits = self.cls_head(self.cls_pooler(features, proposals, image_shapes))
        # float32 scores under autocast: the score threshold and NMS order compare values ~1e-3 apart
        probs = F.softmax(logits.float(), dim=-1).split([p.shape[0] for p in proposals])
        out_boxes, out_scores, out_labels = [], [], []
        for props, prob in zip(proposals, probs):
            keep, scores = class_nms(props, prob[:, 1:], self.score_thresh, self.nms_thresh, self.detections_per_img)
            c = prob.shape[1] - 1
            out_boxes.append(props[keep // c])
            out_scores.append(scores)
            out_labels.append(keep % c + 1)
        return out_boxes, out_scores, out_labels

    def _collab_features(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]):
        return self.collab_head.features(self.collab_pooler(features, boxes, image_shapes))

    def _vote(self, features, boxes: list[Tensor], labels: list[Tensor], image_shapes) -> list[Tensor]:
        """Per image: the voted box (N, 4) of every detection (first pass of the collaborative head)."""
        counts = [b.shape[0] for b in boxes]
        rois = torch.cat(boxes)
        if torch.jit.is_tracing():
            # torch.stack, not torch.tensor: while tracing for ONNX export the sizes are 0-d tensors, and
            # torch.tensor would freeze them at the example image's size (wrong clipping at other sizes).
            parts = [torch.stack([torch.as_tensor(h), torch.as_tensor(w)]).to(rois.device).expand(n, 2)
                     for (h, w), n in zip(image_shapes, counts)]
        else:
            # filled on the device: a host tensor copied there would be a blocking copy (a stream sync)
            parts = [torch.stack([rois.new_full((n,), float(h)), rois.new_full((n,), float(w))], dim=1)
                     for (h, w), n in zip(image_shapes, counts)]
        hw = torch.cat(parts).reshape(-1, 2)
        head = self.collab_head
        feat = self._collab_features(features, boxes, image_shapes)
        # Voting in float32 under autocast: in half precision a decoded coordinate near 1000 px is off by up
        # to 0.5 px (float16) or 4 px (bfloat16).
        offsets = head.offsets(feat).float()
        fg = fg_confidence(head.mask_logits(feat, torch.cat(labels)).float())
        voted = clamp_boxes(vote_boxes(rois, offsets, fg, self.vote_thresh, self.collaborative), hw)
        return list(voted.split(counts))

    def _masks(self, features, boxes: list[Tensor], labels: list[Tensor], image_shapes) -> list[Tensor]:
        """Per image: (N, 1, 28, 28) mask probabilities of the class `labels` over `boxes` (second pass)."""
        feat = self._collab_features(features, boxes, image_shapes)
        # float32: bfloat16 masks cannot become numpy arrays
        masks = self.collab_head.mask_logits(feat, torch.cat(labels)).float().sigmoid()
        return list(masks.split([b.shape[0] for b in boxes]))

    def _roi_pass(self, roi_pass, features, boxes: list[Tensor], labels: list[Tensor], image_shapes) -> list[Tensor]:
        if not self.pad_rois:
            return roi_pass(features, boxes, labels, image_shapes)
        boxes = [torch.cat([b, b.new_tensor([[0.0, 0.0, 1.0, 1.0]])]) for b in boxes]
        labels = [torch.cat([lab, lab.new_ones(1)]) for lab in labels]
        return [out[:-1] for out in roi_pass(features, boxes, labels, image_shapes)]

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        # The RPN decodes its proposals in the dtype of its deltas (float16 / bfloat16 under autocast); the
        # RoI stage's box arithmetic runs in float32 (in float16 a box's area overflows past 256 x 256 px,
        # which would send large RoIs to the wrong FPN level).
        proposals = [p.float() for p in proposals]
        if self.training:
            targets = self._check_targets(targets, len(proposals))
            return [], self._losses(features, proposals, image_shapes, targets)
        boxes, scores, labels = self._detect(features, proposals, image_shapes)
        voted = self._roi_pass(self._vote, features, boxes, labels, image_shapes)
        if self.nms_after_vote:
            # Proposals that overlap too little to suppress each other can vote for the same object's box:
            # without a second NMS both stay, and one of them is a false positive at every IoU threshold.
            keeps = [nms_per_class(b, s, lab, self.nms_thresh) for b, s, lab in zip(voted, scores, labels)]
            voted = [b[k] for b, k in zip(voted, keeps)]
            scores = [s[k] for s, k in zip(scores, keeps)]
            labels = [lab[k] for lab, k in zip(labels, keeps)]
        masks = self._roi_pass(self._masks, features, voted, labels, image_shapes)
        results = [
            {"boxes": b, "labels": lab, "scores": s, "masks": m}
            for b, lab, s, m in zip(voted, labels, scores, masks)
        ]
        return results, {}


def build_comask_roi_heads(cfg, in_channels: int) -> CoMaskRoIHeads:
    """CoMaskRoIHeads from a config's `model` section (`cfg.model.roi`, `box_head`, `collab_head`, `test`)."""
    m = cfg.model
    roi, box, col, test = m.roi, m.box_head, m.collab_head, m.test
    return CoMaskRoIHeads(
        in_channels,
        int(m.num_classes),
        fc_dim=int(box.fc_dim),
        conv_dim=int(col.conv_dim),
        num_convs=int(col.num_convs),
        mask_skip=bool(col.mask_skip),
        batch_size_per_image=int(roi.batch_size_per_image),
        positive_fraction=float(roi.positive_fraction),
        fg_iou_thresh=float(roi.fg_iou_thresh),
        bg_iou_thresh=float(roi.bg_iou_thresh),
        cls_loss_weight=float(box.cls_loss_weight),
        jitter=float(col.jitter),
        max_pos_per_image=int(col.max_pos_per_image),
        offset_loss_weight=float(col.offset_loss_weight),
        mask_loss_weight=float(col.mask_loss_weight),
        vote_thresh=float(col.vote_thresh),
        collaborative=bool(col.collaborative),
        score_thresh=float(test.score_thresh),
        nms_thresh=float(test.nms_thresh),
        nms_after_vote=bool(test.nms_after_vote),
        detections_per_img=int(test.detections_per_img),
    )
