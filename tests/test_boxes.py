"""Box geometry: properties on random boxes (hypothesis) checked against torchvision."""
import torch
import torchvision
from hypothesis import given, settings, strategies as st

from detlearn.boxes import box_iou, generalized_box_iou, batched_nms, box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

coord = st.floats(0, 100, allow_nan=False, allow_subnormal=False, width=32)
# sides are 0 (degenerate boxes) or at least 2**-10 px: areas of sides like 1e-45 underflow in float32,
# where no two implementations agree and no image has such boxes
side = st.one_of(st.just(0.0), st.floats(0.0009765625, 50, width=32))  # 2**-10
box = st.tuples(coord, coord, side, side)  # x, y, w, h
boxes = st.lists(box, min_size=1, max_size=6).map(
    lambda b: torch.tensor([[x, y, x + w, y + h] for x, y, w, h in b], dtype=torch.float32))


@settings(max_examples=60, deadline=None)
@given(boxes, boxes)
def test_iou_and_giou_properties(a, b):
    iou, giou = box_iou(a, b), generalized_box_iou(a, b)
    assert torch.isfinite(iou).all() and torch.isfinite(giou).all()
    assert (iou >= 0).all() and (iou <= 1 + 1e-6).all()
    assert (giou <= iou + 1e-6).all() and (giou >= -1 - 1e-6).all()  # the penalty is in [0, 1]
    torch.testing.assert_close(box_iou(b, a), iou.T)  # symmetric
    ref_iou, ref_giou = torchvision.ops.box_iou(a, b), torchvision.ops.generalized_box_iou(a, b)
    ok = torch.isfinite(ref_giou)  # torchvision divides by 0 for two degenerate boxes
    torch.testing.assert_close(iou[ok], ref_iou[ok], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(giou[ok], ref_giou[ok], atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(boxes)
def test_round_trip_and_nms_keeps_the_best_box(b):
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(b)), b, atol=1e-4, rtol=0)
    scores = torch.linspace(1, 0.5, len(b))
    keep = batched_nms(b, scores, torch.zeros(len(b), dtype=torch.int64), 0.5)
    assert keep[0] == 0  # the highest-scoring box always survives
    kept = b[keep]
    assert (box_iou(kept, kept).fill_diagonal_(0) <= 0.5 + 1e-6).all()  # no two survivors overlap above the threshold
