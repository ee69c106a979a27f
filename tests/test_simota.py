"""SimOTA (detlearn.assign.simota): hand-computed cases, brute-force references, edge cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from detlearn.assign.simota import (dynamic_k_matching, simota_assign, simota_candidates, simota_cls_cost)
from detlearn.boxes import box_xyxy_to_cxcywh

from anchor_fixtures import logit, make_anchors


def test_one_gt_three_candidates_known_answer():
    # IoUs 0.9, 0.8, 0.5 -> k = int(2.2) = 2; q = 0.1, 0.8, 0.8 -> costs 2.619, 0.892, 2.303 -> anchors 1, 2
    grids, strides = torch.tensor([[0., 0.], [1., 0.], [2., 0.]]), torch.full((3,), 10.)
    preds = box_xyxy_to_cxcywh(torch.tensor([[0., 0., 27., 10.], [0., 0., 24., 10.], [0., 0., 15., 10.]]))
    cls = torch.tensor([[logit(q * q)] for q in (0.1, 0.8, 0.8)])
    r = simota_assign(preds, torch.full((3,), 30.), cls, torch.tensor([[0., 0., 30., 10.]]), torch.tensor([0]), grids, strides)
    assert r.fg_mask.tolist() == [False, True, True]
    assert r.matched_gt.tolist() == [0, 0] and r.num_fg == 2
    torch.testing.assert_close(r.matched_iou, torch.tensor([0.8, 0.5]))
    torch.testing.assert_close(r.cost, torch.tensor([[2.619, 0.892, 2.303]]), atol=1e-3, rtol=0)


@pytest.mark.parametrize('q, winner', [((0.5, 0.5), 0), ((0.01, 0.99), 1)])
def test_two_gts_compete_for_one_anchor(q, winner):
    # gt 0 = the predicted box (IoU 1), gt 1 overlaps 64/136; costs (1.386, 3.648) resp. (9.210, 2.281)
    gts = torch.tensor([[0., 0., 10., 10.], [2., 2., 12., 12.]])
    r = simota_assign(torch.tensor([[5., 5., 10., 10.]]), torch.tensor([30.]), torch.tensor([[logit(p * p) for p in q]]),
                      gts, torch.tensor([0, 1]), torch.zeros(1, 2), torch.tensor([10.]))
    assert r.matched_gt.tolist() == [winner]


def test_cls_cost_equals_literal_bce():
    torch.manual_seed(1)
    cls, obj, labels = torch.randn(40, 7) * 5, torch.randn(40) * 5, torch.randint(0, 7, (9,))
    cls[0, 3], obj[5] = 80., -80.  # saturated: the -100 log clamp is active
    q = (cls.sigmoid() * obj.sigmoid()[:, None]).sqrt()
    onehot = F.one_hot(labels, 7).float()
    ref = torch.stack([F.binary_cross_entropy(q, onehot[i].expand_as(q), reduction='none').sum(1) for i in range(9)])
    torch.testing.assert_close(simota_cls_cost(cls, obj, labels), ref, rtol=1e-5, atol=1e-4)


def brute_force_matching(cost, ious, topk=10):
    """Same rule written with Python lists: sort, take k, then resolve clashes by the column minimum."""
    G, N = cost.shape
    chosen = {}
    for i in range(G):
        k = max(1, int(sum(sorted(ious[i].tolist(), reverse=True)[:min(topk, N)])))
        for j in sorted(range(N), key=lambda j: cost[i, j].item())[:k]:
            chosen.setdefault(j, []).append(i)
    out = torch.zeros(G, N, dtype=torch.bool)
    for j, gts in chosen.items():
        best = min(range(G), key=lambda i: cost[i, j].item()) if len(gts) > 1 else gts[0]
        out[best, j] = True
    return out


@pytest.mark.parametrize('seed', range(5))
def test_dynamic_k_matching_vs_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    cost, ious = torch.rand(4, 30, generator=gen) * 10, torch.rand(4, 30, generator=gen) ** 2
    assert torch.equal(dynamic_k_matching(cost, ious), brute_force_matching(cost, ious))


def test_candidates_vs_per_anchor_loop():
    grids, strides = make_anchors(64)
    gts = torch.tensor([[3., 5., 20., 40.], [30., 30., 33., 31.], [40., 2., 63., 60.]])
    cand, prior = simota_candidates(gts, grids, strides, center_radius=2.5, in_box=True)
    ref_prior = torch.zeros(3, len(grids), dtype=torch.bool)
    ref_cand = torch.zeros(len(grids), dtype=torch.bool)
    for j, ((c, r), s) in enumerate(zip(grids.tolist(), strides.tolist())):
        x, y = (c + 0.5) * s, (r + 0.5) * s
        for i, (x1, y1, x2, y2) in enumerate(gts.tolist()):
            in_sq = abs(x - (x1 + x2) / 2) < 2.5 * s and abs(y - (y1 + y2) / 2) < 2.5 * s
            in_bx = x1 < x < x2 and y1 < y < y2
            ref_cand[j] |= in_sq or in_bx
            ref_prior[i, j] = in_sq and in_bx
    assert torch.equal(cand, ref_cand) and torch.equal(prior, ref_prior[:, ref_cand])


def test_no_gt_is_all_background():
    grids, strides = make_anchors(64)
    n = len(grids)
    r = simota_assign(torch.rand(n, 4) * 30 + 1, torch.randn(n), torch.randn(n, 3), torch.zeros(0, 4),
                      torch.zeros(0, dtype=torch.int64), grids, strides)
    assert r.num_fg == 0 and r.fg_mask.shape == (n,) and not r.fg_mask.any() and len(r.matched_gt) == 0


@pytest.mark.parametrize('rule', [dict(), dict(center_radius=2.5, in_box=True)])
def test_gt_smaller_than_a_stride_gets_an_anchor(rule):
    grids, strides = make_anchors(64)
    n = len(grids)
    preds = torch.tensor([[4., 4., 8., 8.]]).expand(n, 4)
    r = simota_assign(preds, torch.zeros(n), torch.zeros(n, 3), torch.tensor([[21., 21., 23., 23.]]),
                      torch.tensor([1]), grids, strides, **rule)
    assert r.num_fg >= 1 and (r.matched_gt == 0).all()


def test_low_precision_inputs_are_assigned_in_float32():
    # a bf16 network output must be assigned exactly like the same numbers in float32
    grids, strides = make_anchors(64)
    n, gen = len(grids), torch.Generator().manual_seed(0)
    preds = torch.cat([torch.rand(n, 2, generator=gen) * 64, torch.rand(n, 2, generator=gen) * 30 + 2], 1).bfloat16()
    obj, cls = torch.randn(n, generator=gen).bfloat16(), torch.randn(n, 4, generator=gen).bfloat16()
    gts, labels = torch.tensor([[3., 5., 20., 40.], [30., 30., 50., 45.]]), torch.tensor([0, 3])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = simota_assign(preds, obj, cls, gts, labels, grids, strides)
    ref = simota_assign(preds.float(), obj.float(), cls.float(), gts, labels, grids, strides)
    assert torch.equal(low.fg_mask, ref.fg_mask) and torch.equal(low.matched_gt, ref.matched_gt)
    assert low.cost.dtype == torch.float32 and low.matched_iou.dtype == torch.float32
