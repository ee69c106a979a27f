"""YOLOX loss (detlearn.models.yolox.loss): hand-computed values, invariants, precision, one-batch overfits."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from detlearn.boxes import box_xyxy_to_cxcywh
from detlearn.models.yolox.loss import YOLOXCriterion, iou_loss, yolox_targets
from detlearn.utils import DetlearnError

from anchor_fixtures import logit, make_anchors


def decode(reg_raw, grids, strides):
    return torch.cat([(reg_raw[..., :2] + grids) * strides[:, None], reg_raw[..., 2:].exp() * strides[:, None]], -1)


def outputs_from(reg, obj, cls, grids, strides):
    return dict(boxes=decode(reg, grids, strides), obj_logits=obj, cls_logits=cls, reg_raw=reg, grids=grids, strides=strides)


def hand_case():
    """Three anchors (stride 10) and one gt (0,0,30,10); SimOTA picks anchors 1, 2 with IoU 0.8, 0.5."""
    grids, strides = torch.tensor([[0., 0.], [1., 0.], [2., 0.]]), torch.full((3,), 10.)
    reg = torch.tensor([[[1.35, 0.5, math.log(2.7), 0.], [0.2, 0.5, math.log(2.4), 0.], [-1.25, 0.5, math.log(1.5), 0.]]])
    obj = torch.tensor([[1., 2., 2.]])
    sig = lambda x: 1 / (1 + math.exp(-x))
    cls = torch.tensor([[[logit(q * q / sig(o))] for q, o in zip((0.1, 0.8, 0.8), (1., 2., 2.))]])
    targets = [dict(boxes=torch.tensor([[0., 0., 30., 10.]]), labels=torch.tensor([0]))]
    return reg, obj, cls, grids, strides, targets


def random_problem(seed, B=3, size=64, K=3):
    gen = torch.Generator().manual_seed(seed)
    grids, strides = make_anchors(size)
    N = len(grids)
    reg = torch.randn(B, N, 4, generator=gen) * 0.5 + 0.5
    obj, cls = torch.randn(B, N, generator=gen) * 2, torch.randn(B, N, K, generator=gen) * 2
    targets = []
    for b in range(B):
        G = b % 3  # 0, 1, 2 objects
        x1y1 = torch.rand(G, 2, generator=gen) * 40
        boxes = torch.cat([x1y1, x1y1 + 4 + torch.rand(G, 2, generator=gen) * 20], 1)
        targets.append(dict(boxes=boxes, labels=torch.randint(0, K, (G,), generator=gen)))
    return outputs_from(reg, obj, cls, grids, strides), targets


def test_hand_computed_values():
    reg, obj, cls, grids, strides, targets = hand_case()
    l = YOLOXCriterion(1)(outputs_from(reg, obj, cls, grids, strides), targets, use_l1=True)
    assert float(l['num_fg']) == 2
    torch.testing.assert_close(l['loss_iou'], torch.tensor(5 * ((1 - 0.8 ** 2) + (1 - 0.5 ** 2)) / 2))
    torch.testing.assert_close(l['loss_l1'], torch.tensor((0.3 + math.log(3 / 2.4) + 0.75 + math.log(2)) / 2))
    exp_obj = F.binary_cross_entropy(obj.sigmoid()[0], torch.tensor([0., 1., 1.]), reduction='sum') / 2
    exp_cls = F.binary_cross_entropy(cls.sigmoid()[0, 1:, 0], torch.tensor([0.8, 0.5]), reduction='sum') / 2
    torch.testing.assert_close(l['loss_obj'], exp_obj)
    torch.testing.assert_close(l['loss_cls'], exp_cls)
    torch.testing.assert_close(l['loss'], l['loss_iou'] + l['loss_obj'] + l['loss_cls'] + l['loss_l1'])
    assert float(YOLOXCriterion(1)(outputs_from(reg, obj, cls, grids, strides), targets)['loss_l1']) == 0


def test_perfect_boxes_have_zero_iou_loss():
    grids, strides = make_anchors(64)
    gts = torch.tensor([[4., 6., 30., 28.], [34., 30., 60., 62.]])
    gt_c = box_xyxy_to_cxcywh(gts)
    near = torch.cdist((grids + 0.5) * strides[:, None], gt_c[:, :2]).argmin(1)
    target_c = gt_c[near]  # every anchor predicts its nearest object exactly
    reg = torch.cat([target_c[:, :2] / strides[:, None] - grids, torch.log(target_c[:, 2:] / strides[:, None])], 1)[None]
    l = YOLOXCriterion(2)(outputs_from(reg, torch.zeros(1, len(grids)), torch.zeros(1, len(grids), 2), grids, strides),
                          [dict(boxes=gts, labels=torch.tensor([0, 1]))], use_l1=True)
    assert float(l['num_fg']) >= 2
    assert abs(float(l['loss_iou'])) < 1e-5 and abs(float(l['loss_l1'])) < 1e-4


def test_iou_loss_known_values_and_giou_reference():
    c = lambda xyxy: box_xyxy_to_cxcywh(torch.tensor(xyxy))
    torch.testing.assert_close(iou_loss(c([[0., 0., 2., 2.]]), c([[1., 0., 3., 2.]])), torch.tensor([8 / 9]))
    a = torch.tensor([[0., 0., 2., 2.], [0., 0., 1., 1.], [0., 0., 4., 3.], [1., 1., 5., 5.]])
    b = torch.tensor([[1., 0., 3., 2.], [2., 2., 3., 3.], [1., 1., 2., 5.], [1., 1., 5., 5.]])
    torch.testing.assert_close(iou_loss(box_xyxy_to_cxcywh(a), box_xyxy_to_cxcywh(b), 'giou'),
                               torchvision.ops.generalized_box_iou_loss(a, b))
    with pytest.raises(DetlearnError, match="'iou' or 'giou'"):
        iou_loss(a, b, 'diou')


def test_gradients_flow_to_the_right_outputs():
    reg, obj, cls, grids, strides, targets = hand_case()
    reg, obj, cls = (t.clone().requires_grad_() for t in (reg, obj, cls))
    YOLOXCriterion(1)(outputs_from(reg, obj, cls, grids, strides), targets, use_l1=True)['loss'].backward()
    assert (reg.grad[0].abs().sum(1) > 0).tolist() == [False, True, True]
    assert (cls.grad[0, :, 0] != 0).tolist() == [False, True, True]
    assert (obj.grad != 0).all()


def test_empty_targets_give_only_objectness():
    reg, obj, cls, grids, strides, _ = hand_case()
    empty = [dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64))]
    l = YOLOXCriterion(1)(outputs_from(reg, obj, cls, grids, strides), empty, use_l1=True)
    torch.testing.assert_close(l['loss'], F.binary_cross_entropy(obj.sigmoid()[0], torch.zeros(3), reduction='sum'))
    assert all(float(l[k]) == 0 for k in ('loss_iou', 'loss_cls', 'loss_l1', 'num_fg'))


@pytest.mark.parametrize('seed', range(3))
def test_batched_equals_per_image(seed):
    out, targets = random_problem(seed)
    crit = YOLOXCriterion(3)
    whole = yolox_targets(out, targets, 3)
    B, N = out['obj_logits'].shape
    parts = [yolox_targets({k: (v[b:b + 1] if k in ('boxes', 'obj_logits', 'cls_logits', 'reg_raw') else v)
                            for k, v in out.items()}, [targets[b]], 3) for b in range(B)]
    assert torch.equal(whole.fg_mask, torch.cat([p.fg_mask for p in parts]))
    assert torch.equal(whole.cls, torch.cat([p.cls for p in parts]))
    # losses are sums over the batch divided by the batch's foreground count
    total = crit(out, targets, use_l1=True)
    single = [crit({k: (v[b:b + 1] if k in ('boxes', 'obj_logits', 'cls_logits', 'reg_raw') else v) for k, v in out.items()},
                   [targets[b]], use_l1=True) for b in range(B)]
    for k in ('loss_iou', 'loss_obj', 'loss_cls', 'loss_l1'):
        recombined = sum(s[k] * max(float(s['num_fg']), 1) for s in single) / max(float(total['num_fg']), 1)
        torch.testing.assert_close(total[k], recombined)
    # a batch of one image twice equals that image alone
    b = 2
    twice = {k: (v[[b, b]] if k in ('boxes', 'obj_logits', 'cls_logits', 'reg_raw') else v) for k, v in out.items()}
    torch.testing.assert_close(crit(twice, [targets[b]] * 2, use_l1=True)['loss'], single[b]['loss'])


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_finite_float32_loss_under_cpu_autocast(dtype):
    out, targets = random_problem(0)
    lin = nn.Linear(8, 4 + 1 + 3)
    feats = torch.randn(3, out['obj_logits'].shape[1], 8)
    with torch.autocast('cpu', dtype=dtype):
        raw = lin(feats)  # (B, N, 8) in low precision
        assert raw.dtype == dtype
        o = outputs_from(raw[..., :4], raw[..., 4], raw[..., 5:], out['grids'], out['strides'])
        l = YOLOXCriterion(3)(o, targets, use_l1=True)
    assert l['loss'].dtype == torch.float32 and torch.isfinite(l['loss'])
    l['loss'].backward()
    assert torch.isfinite(lin.weight.grad).all() and lin.weight.grad.abs().sum() > 0


def test_bad_targets_raise_clear_errors():
    out, targets = random_problem(0)
    crit = YOLOXCriterion(3)
    with pytest.raises(DetlearnError, match='2 target dicts for a batch of 3'):
        crit(out, targets[:2])
    bad = [dict(t) for t in targets]
    bad[1] = dict(boxes=torch.zeros(1, 4), labels=torch.tensor([5]), image_id=17)
    with pytest.raises(DetlearnError, match='image 1 .image_id 17.: label 5 is outside 0..2'):
        crit(out, bad)
    bad[1] = dict(boxes=torch.zeros(2, 5), labels=torch.tensor([0, 1]))
    with pytest.raises(DetlearnError, match='boxes must be .G, 4.'):
        crit(out, bad)


def test_overfit_learnable_raw_outputs():
    grids, strides = make_anchors(64)
    N = len(grids)
    raw = nn.ParameterDict(dict(reg=torch.zeros(1, N, 4), obj=torch.full((1, N), -4.6), cls=torch.full((1, N, 2), -4.6)))
    gts = [dict(boxes=torch.tensor([[4., 6., 30., 28.], [34., 30., 60., 62.]]), labels=torch.tensor([0, 1]))]
    crit = YOLOXCriterion(2)
    opt = torch.optim.Adam([dict(params=[raw['reg']], lr=0.03), dict(params=[raw['obj'], raw['cls']], lr=0.3)])
    first = None
    for step in range(100):
        out = outputs_from(raw['reg'], raw['obj'], raw['cls'], grids, strides)
        l = crit(out, gts)
        first = first or float(l['loss'].detach())
        opt.zero_grad(); l['loss'].backward(); opt.step()
    assert float(l['loss'].detach()) < 0.1 * first
    t = yolox_targets(outputs_from(raw['reg'], raw['obj'], raw['cls'], grids, strides), gts, 2)
    ious = t.cls.max(1).values  # IoU-aware class targets = matched IoUs
    assert t.num_fg >= 2 and ious.min() > 0.9
    assert set(t.cls.argmax(1).tolist()) == {0, 1}  # both objects keep anchors
    # background anchors learned "no object"
    assert raw['obj'][0][~t.fg_mask].sigmoid().max() < 0.05


def test_overfit_yolox_nano_one_batch():
    from detlearn.models import yolox
    torch.manual_seed(0)
    model = yolox.YOLOX(yolox.yolox_nano(num_classes=2)).train()
    images = torch.full((2, 3, 64, 64), 114.)
    images[0, :, 8:40, 4:36] = 230.; images[1, :, 30:60, 20:44] = 20.
    targets = [dict(boxes=torch.tensor([[4., 8., 36., 40.]]), labels=torch.tensor([0])),
               dict(boxes=torch.tensor([[20., 30., 44., 60.]]), labels=torch.tensor([1]))]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):  # ~0.15 s a step on one CPU thread
        l = model.loss(model(images), targets)
        opt.zero_grad(); l['loss'].backward(); opt.step()
        losses.append(float(l['loss'].detach()))
    assert losses[-1] < 0.5 * losses[0], losses
