"""Training internals through the family seam, checked against independent computations, and in FiftyOne.

* YOLOX: each object's SimOTA dynamic k equals a brute force (centre-square candidates, torchvision IoUs, the sum
  of the top 10, floored, at least 1) on the same outputs; the anchors per object and the positive anchor of each
  detection equal what the loss's own target builder (`yolox_targets`) assigns.
* D-FINE: each detection's edge uncertainty equals a numpy computation from the final layer's logits (softmax,
  variance over W(n), times the reference box size / c, in original pixels); its Hungarian match is SciPy's
  assignment of the criterion's cost matrix.
* FiftyOne: a checkpoint's dataset carries the fields (ground truth: simota_dynamic_k, simota_num_anchors;
  predictions: simota_positive, simota_gt_coco_id, edge_uncertainty*, hungarian_gt_coco_id), the values equal the
  hook's on the pipeline's inputs, and `--no-internals` leaves them out.
Run alone: `pytest tests/test_fiftyone_internals.py` (about a minute on 2 idle cores, mostly FiftyOne's mongod).
"""
import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from detlearn.models import create

CENTER_RADIUS, TOPK = 1.5, 10  # YOLOXCriterion's defaults (the official values since 2023)

pytestmark = pytest.mark.xdist_group('fiftyone')  # share the worker (and its mongod) with test_fiftyone


def _yolox(seed: int = 0):
    torch.manual_seed(seed)
    model = create('yolox_nano', num_classes=3, cfg_overrides={'width': 0.125, 'conf_thre': 0.0})
    for conv in [*model.head.obj_preds, *model.head.cls_preds]: torch.nn.init.zeros_(conv.bias)
    return model.eval()


def _targets():
    return [{'boxes': torch.tensor([[10., 10., 60., 50.], [70., 64., 120., 120.], [20., 70., 28., 78.]]),
             'labels': torch.tensor([0, 2, 1])},
            {'boxes': torch.tensor([[0., 0., 128., 96.]]), 'labels': torch.tensor([1])}]


def _half_trained_boxes(out, targets):
    """(B, N, 4) cxcywh: each anchor predicts, around its own centre, the size of the nearest object (x0.8..1.2)."""
    centers = (out['grids'] + 0.5) * out['strides'][:, None]  # (N, 2)
    boxes = []
    for t in targets:
        gt = torchvision.ops.box_convert(t['boxes'], 'xyxy', 'cxcywh')  # (G, 4)
        nearest = torch.cdist(centers, gt[:, :2]).argmin(1)  # (N,)
        scale = 0.8 + 0.4 * torch.rand(len(centers), 1)
        boxes.append(torch.cat([centers, gt[nearest, 2:] * scale], 1))
    return torch.stack(boxes)


def brute_force_dynamic_k(pred_cxcywh, grids, strides, gt_xyxy):
    """k per gt from first principles: anchors whose centre is inside the 1.5-stride square around the gt centre."""
    centers = ((grids + 0.5) * strides[:, None]).numpy()
    s, gt = strides.numpy(), gt_xyxy.numpy()
    gt_c = (gt[:, :2] + gt[:, 2:]) / 2
    cand = np.zeros(len(centers), bool)
    for g in range(len(gt)):
        r = CENTER_RADIUS * s
        cand |= (np.abs(centers[:, 0] - gt_c[g, 0]) < r) & (np.abs(centers[:, 1] - gt_c[g, 1]) < r)
    pred_xyxy = torchvision.ops.box_convert(pred_cxcywh[torch.from_numpy(cand)], 'cxcywh', 'xyxy')
    ious = torchvision.ops.box_iou(gt_xyxy, pred_xyxy).numpy()  # (G, Nc)
    top = -np.sort(-ious, axis=1)[:, :TOPK]
    return np.maximum(1, np.floor(top.sum(1))).astype(int)


def test_yolox_dynamic_k_and_matches_equal_simota_and_the_loss():
    from detlearn.models.family import Internals
    from detlearn.models.yolox.family import YOLOX_FAMILY
    from detlearn.models.yolox.loss import yolox_targets
    model, targets = _yolox(), _targets()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 128, 128) * 255)
    dets = model.postprocess(out, torch.tensor([[128, 128], [128, 128]]))
    out['boxes'] = _half_trained_boxes(out, targets)  # untrained boxes overlap nothing: every k would be 1
    got = YOLOX_FAMILY.training_internals(model, out, targets, dets)
    assert len(got) == 2 and all(isinstance(g, Internals) for g in got)
    loss_targets = yolox_targets(out, targets, 3, {'center_radius': CENTER_RADIUS, 'topk_candidates': TOPK})
    fg = loss_targets.fg_mask.view(2, -1)  # (B, N) the loss's positives
    matched_boxes = loss_targets.boxes_cxcywh.split(fg.sum(1).tolist())  # per image (F_b, 4): each positive's gt
    for b, (t, g, det) in enumerate(zip(targets, got, dets)):
        want_k = brute_force_dynamic_k(out['boxes'][b], out['grids'], out['strides'], t['boxes'])
        assert g.gt['simota_dynamic_k'].tolist() == want_k.tolist()
        gt_cxcywh = torchvision.ops.box_convert(t['boxes'], 'xyxy', 'cxcywh')
        gt_of_positive = torch.cdist(matched_boxes[b], gt_cxcywh).argmin(1)  # (F_b,) boxes are distinct
        assert g.gt['simota_num_anchors'].tolist() == torch.bincount(gt_of_positive, minlength=len(gt_cxcywh)).tolist()
        assert torch.equal(g.detections['simota_positive'], fg[b][det['index']])
        per_anchor = torch.full((fg.shape[1],), -1)
        per_anchor[fg[b]] = gt_of_positive
        assert torch.equal(g.matched_gt['simota'], per_anchor[det['index']])
    assert any(g.detections['simota_positive'].any() for g in got)  # the check saw positives
    assert max(max(g.gt['simota_dynamic_k'].tolist()) for g in got) > 1  # and objects asking for several anchors


def test_dfine_edge_uncertainty_and_hungarian_match_are_independent_computations():
    from scipy.optimize import linear_sum_assignment
    from detlearn.models.dfine import dfine_targets
    from detlearn.models.dfine.family import DFINE_FAMILY
    torch.manual_seed(0)
    model = create('dfine_n', num_classes=3)
    for head in model.decoder.dec_bbox_head: torch.nn.init.normal_(head.layers[-1].weight, std=0.5)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 320, 320))
    targets = [{'boxes': torch.tensor([[10., 20., 100., 200.], [150., 150., 300., 310.]]),
                'labels': torch.tensor([0, 2]), 'size': (320, 320), 'orig_size': (240, 480)}]
    dets = model.postprocess(out, torch.tensor([[240, 480]]))
    got = DFINE_FAMILY.training_internals(model, out, targets, dets)[0]
    q = dets[0]['index'].numpy()
    logits = out['pred_corners'][0].numpy().astype(np.float64)[q].reshape(len(q), 4, 33)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    u, c, n = 0.5, 4.0, 32  # W(n) of the paper's Eq. 3 written out again
    step = (u * c + 1) ** (2 / (n - 2))
    right = [step ** i - 1 for i in range(1, n // 2)]
    w_n = np.array([-2 * u * c] + [-v for v in reversed(right)] + [0.0] + right + [2 * u * c])
    mean = p @ w_n
    std = np.sqrt((p * (w_n[None, None] - mean[..., None]) ** 2).sum(-1))  # (M, 4) units of the offsets
    ref = out['ref_points'][0].numpy()[q]  # (M, 4) cx, cy, w, h normalised
    pixels = std * np.stack([ref[:, 2] * 480, ref[:, 3] * 240, ref[:, 2] * 480, ref[:, 3] * 240], 1) / c
    for i, edge in enumerate(('left', 'top', 'right', 'bottom')):
        np.testing.assert_allclose(got.detections[f'edge_uncertainty_{edge}'].numpy(), pixels[:, i], rtol=1e-4)
    np.testing.assert_allclose(got.detections['edge_uncertainty'].numpy(), pixels.mean(1), rtol=1e-4)
    assert pixels.std() > 0  # the distributions differ, so the comparison means something
    cost = model.criterion.matcher.cost_matrix(out['pred_logits'], out['pred_boxes'],
                                               dfine_targets(targets, (320, 320)))[0].numpy()  # (Q, G)
    rows, cols = linear_sum_assignment(cost)
    want = np.full(cost.shape[0], -1)
    want[rows] = cols
    assert got.matched_gt['hungarian'].tolist() == want[q].tolist()


@pytest.fixture(scope='module')
def shapes3(tmp_path_factory):
    from detlearn.data.samples import sample_dataset
    ann, images = sample_dataset('shapes', 'val')
    coco = json.loads(Path(ann).read_text())
    keep = {im['id'] for im in coco['images'][:3]}
    subset = coco | {'images': coco['images'][:3], 'annotations': [a for a in coco['annotations']
                                                                   if a['image_id'] in keep]}
    path = tmp_path_factory.mktemp('fo-internals') / 'val3.json'
    path.write_text(json.dumps(subset))
    return path, Path(images), subset


def _save(model, preset, img_size, overrides, names, path):
    from detlearn.train_utils import save_checkpoint
    save_checkpoint({'model': model.state_dict(), 'class_names': names, 'cat_ids': [1, 3, 5, 7], 'format': 'detlearn-1',
                     'meta': {'model_name': preset, 'img_size': img_size, 'num_classes': 4,
                              'model_overrides': overrides}}, path)


def test_yolox_internals_in_fiftyone_equal_the_hook(fo, shapes3, tmp_path):
    from detlearn.assign.simota import simota_assign
    from detlearn.integrations.fiftyone import add_fiftyone_parser, cmd_fiftyone, gt_target, to_fiftyone
    from detlearn.pipeline import pipeline, read_image
    ann, images, coco = shapes3
    names = [c['name'] for c in sorted(coco['categories'], key=lambda c: c['id'])]
    torch.manual_seed(0)
    net = create('yolox_nano', num_classes=4, cfg_overrides={'width': 0.125})
    for conv in [*net.head.obj_preds, *net.head.cls_preds]: torch.nn.init.zeros_(conv.bias)
    _save(net, 'yolox_nano', 256, {'width': 0.125}, names, tmp_path / 'y.pth')
    ds = to_fiftyone(ann, images, checkpoint=tmp_path / 'y.pth', name='t-internals-yolox', max_detections=20)
    gt_k = {d.coco_id: d.simota_dynamic_k for per in ds.values('ground_truth.detections') for d in per}
    assert set(gt_k) == {a['id'] for a in coco['annotations']}
    # the same k straight from simota_assign on the pipeline's inputs and outputs
    detect = pipeline('image-object-detection', model=tmp_path / 'y.pth', score_threshold=0.0)
    cat_names = {c['id']: c['name'] for c in coco['categories']}
    for im in coco['images']:
        image = read_image(images / im['file_name'])
        anns = [a for a in coco['annotations'] if a['image_id'] == im['id']]
        x, t = detect.transforms(image, gt_target(image, anns, cat_names, detect.class_names))
        with torch.no_grad():
            out = detect.model(x[None])
        res = simota_assign(out['boxes'][0], out['obj_logits'][0], out['cls_logits'][0], t['boxes'], t['labels'],
                            out['grids'], out['strides'])
        assert [gt_k[i] for i in t['ann_id'].tolist()] == res.dynamic_k.tolist()
    dets = [d for per in ds.values('predictions.detections') for d in per]
    assert dets and all(isinstance(d.simota_positive, bool) for d in dets)
    ann_image = {a['id']: a['image_id'] for a in coco['annotations']}
    for sample in ds:
        for d in sample.predictions.detections:
            assert d.simota_gt_coco_id == -1 if not d.simota_positive else ann_image[d.simota_gt_coco_id] == sample.coco_id
    parser = argparse.ArgumentParser(prog='detlearn')
    add_fiftyone_parser(parser.add_subparsers(dest='command'))
    args = parser.parse_args(['fiftyone', '--ann', str(ann), '--images', str(images), '--checkpoint',
                              str(tmp_path / 'y.pth'), '--name', 't-no-internals', '--no-launch', '--no-internals',
                              '--max-detections', '5'])
    assert cmd_fiftyone(args) == 0
    plain = fo.load_dataset('t-no-internals')
    assert plain.count('predictions.detections') > 0
    assert not plain.has_field('predictions.detections.simota_positive')
    assert not plain.has_field('ground_truth.detections.simota_dynamic_k')


def test_dfine_internals_in_fiftyone(fo, shapes3, tmp_path):
    from detlearn.integrations.fiftyone import to_fiftyone
    ann, images, coco = shapes3
    names = [c['name'] for c in sorted(coco['categories'], key=lambda c: c['id'])]
    torch.manual_seed(0)
    net = create('dfine_n', num_classes=4)
    _save(net, 'dfine_n', 320, {}, names, tmp_path / 'd.pth')
    ds = to_fiftyone(ann, images, checkpoint=tmp_path / 'd.pth', name='t-internals-dfine', max_detections=10)
    dets = [d for per in ds.values('predictions.detections') for d in per]
    assert len(dets) == 10 * len(coco['images'])
    for d in dets:
        edges = [d[f'edge_uncertainty_{e}'] for e in ('left', 'top', 'right', 'bottom')]
        assert min(edges) > 0 and d.edge_uncertainty == pytest.approx(sum(edges) / 4, rel=1e-5)
        assert isinstance(d.hungarian_gt_coco_id, int)
    matched = {d.hungarian_gt_coco_id for d in dets} - {-1}
    assert matched <= {a['id'] for a in coco['annotations']}
    assert not ds.has_field('ground_truth.detections.simota_dynamic_k')  # D-FINE has no per-object internals
