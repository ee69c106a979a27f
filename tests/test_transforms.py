"""Property tests for detlearn.data.transforms*: under every transform, boxes follow the pixels.

Each sample is a black image with up to four filled rectangles of distinct saturated colours, one per
label, whose boxes are the rectangles' exact pixel edges. After a transform with random parameters, the
pixels that still have (nearly) that colour must lie inside a box of that label (up to interpolation
slack), the box must not be much larger than those pixels, and every box must lie inside the image.
"""
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from detlearn.data.transforms import (Compose, Letterbox, RandomHorizontalFlip, RandomResize, RandomSizeCrop, Resize,
                                      SanitizeBoxes, ToTensor, detr_transforms, letterbox)
from detlearn.data.transforms_dfine import (RandomIoUCrop, RandomPhotometricDistort, RandomZoomOut, StopEpochCompose,
                                            dfine_transforms)
from detlearn.data.transforms_yolox import (MosaicMixupDataset, RandomHSV, mixup, mosaic, random_affine,
                                            yolox_transforms)
from detlearn.utils import DetlearnError

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.int64)
FAST = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def make_target(boxes, labels, hw):
    return {'boxes': np.asarray(boxes, np.float32).reshape(-1, 4), 'labels': np.asarray(labels, np.int64),
            'image_id': 3, 'orig_size': tuple(hw), 'size': tuple(hw)}


@st.composite
def samples(draw, min_side=40, max_side=160, min_rects=0, max_rects=4, label=None):
    """A black image with non-overlapping rectangles (one per quadrant), colour = COLOURS[label]."""
    h, w = draw(st.integers(min_side, max_side)), draw(st.integers(min_side, max_side))
    n = draw(st.integers(min_rects, max_rects))
    image = np.zeros((h, w, 3), np.uint8)
    boxes, labels = [], []
    for k in range(n):
        qy, qx = divmod(k, 2)
        y0, y_end, x0, x_end = qy * h // 2, (qy + 1) * h // 2, qx * w // 2, (qx + 1) * w // 2
        x1 = draw(st.integers(x0, x_end - 4)); x2 = draw(st.integers(x1 + 4, x_end))
        y1 = draw(st.integers(y0, y_end - 4)); y2 = draw(st.integers(y1 + 4, y_end))
        lab = k if label is None else label
        image[y1:y2, x1:x2] = COLOURS[lab]
        boxes.append([x1, y1, x2, y2]); labels.append(lab)
    return image, make_target(boxes, labels, (h, w))


def colour_mask(image, colour, tol=40):
    return (np.abs(image.astype(np.int64) - colour).max(-1) <= tol)


def assert_boxes_follow(image, target, colours=COLOURS, slack=1.0, tight_slack=None, tight_at_border=True):
    """Every pixel of label k's colour lies in a box of label k; boxes lie in the image; optionally boxes are tight."""
    h, w = image.shape[:2]
    boxes, labels = target['boxes'], target['labels']
    assert boxes.dtype == np.float32 and boxes.shape == (len(labels), 4)
    assert tuple(target['size']) == (h, w)
    assert (boxes[:, [0, 1]] >= 0).all() and (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    for lab in np.unique(labels):
        ys, xs = np.nonzero(colour_mask(image, colours[lab]))
        own = boxes[labels == lab]
        inside = np.zeros(len(xs), bool)
        for x1, y1, x2, y2 in own:
            inside |= (xs >= x1 - slack) & (xs + 1 <= x2 + slack) & (ys >= y1 - slack) & (ys + 1 <= y2 + slack)
        assert inside.all(), f'label {lab}: {(~inside).sum()} pixels of its colour lie outside its boxes {own}'
        if tight_slack is not None and len(own) == 1 and len(xs):
            x1, y1, x2, y2 = own[0]
            at_border = x1 < 0.5 or y1 < 0.5 or x2 > w - 0.5 or y2 > h - 0.5
            if x2 - x1 >= 6 and y2 - y1 >= 6 and (tight_at_border or not at_border):
                extent = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                assert np.abs(extent - own[0]).max() <= tight_slack, f'label {lab}: box {own[0]} vs pixels {extent}'


def tight_slack(before, after, scale=1.5):
    """Bilinear upsampling by k blurs an edge over ~k/2 output pixels."""
    k = max(after.shape[0] / before.shape[0], after.shape[1] / before.shape[1], scale)
    return 2.5 + 0.5 * k


def affine(image, target):
    return random_affine(image, target, (128, 128), degrees=10, translate=0.1, scale_range=(0.5, 1.5), shear=2.0)


GEOMETRIC = {
    'hflip': RandomHorizontalFlip(1.0),
    'random_resize_pil': RandomResize([32, 64, 100, 150], max_size=250),
    'random_resize_cv2': RandomResize([32, 64, 100, 150], max_size=250, backend='cv2'),
    'square_resize': Resize((64, 96)),
    'size_crop': RandomSizeCrop(20, 100),
    'letterbox': Letterbox(128),
    'affine': affine,
    'zoom_out': RandomZoomOut(p=1.0, side_range=(1.0, 3.0)),
    'iou_crop': RandomIoUCrop(p=1.0),
    'sanitize': SanitizeBoxes(2.0),
    'yolox_geometry': Compose([RandomHorizontalFlip(), Letterbox(96), SanitizeBoxes(1.0)]),
    'dfine_geometry': Compose([t for t in dfine_transforms(True, 96).transforms[:-1]
                               if not isinstance(t, RandomPhotometricDistort)]),
}


@pytest.mark.parametrize('name', list(GEOMETRIC))
@FAST
@given(sample=samples(), seed=st.integers(0, 2**31))
def test_boxes_follow_pixels(name, sample, seed):
    image, target = sample
    random.seed(seed)
    out, tgt = GEOMETRIC[name](image, target)
    assert out.dtype == np.uint8 and out.ndim == 3
    # a rotated box cut by the border keeps the clipped enclosing box of all four corners (as YOLOX): not tight there
    assert_boxes_follow(out, tgt, tight_slack=tight_slack(image, out), tight_at_border=name != 'affine')


@FAST
@given(sample=samples(min_side=40, max_side=120), seed=st.integers(0, 2**31))
def test_detr_train_pipeline_boxes_follow_pixels(sample, seed):
    image, target = sample
    random.seed(seed)
    out, tgt = Compose(detr_transforms(True).transforms[:-1])(image, target)  # without normalisation
    assert 480 <= min(out.shape[:2]) <= 800 or max(out.shape[:2]) <= 1334  # DETR's rounding may overshoot by 1
    assert_boxes_follow(out, tgt)  # upsampling up to 20x: coverage only


@FAST
@given(parts=st.lists(samples(min_rects=1, max_rects=1), min_size=4, max_size=4),
       cx=st.integers(32, 96), cy=st.integers(32, 96))
def test_mosaic_boxes_follow_pixels(parts, cx, cy):
    parts = [(np.where(img.any(-1, keepdims=True), COLOURS[k], 0).astype(np.uint8), {**t, 'labels': np.array([k])})
             for k, (img, t) in enumerate(parts)]
    canvas, tgt = mosaic(parts, 64, (cx, cy))
    assert canvas.shape == (128, 128, 3)
    assert_boxes_follow(canvas, tgt, tight_slack=tight_slack(parts[0][0], canvas, 1.6 * 1.5))


class InTurn(list):
    """A dataset handing out its samples in turn, whatever index is asked: each mosaic gets four distinct parts.

    (With repeats, a copy dropped as too thin would leave visible pixels of a label that another copy keeps.)"""
    calls = 0

    def __getitem__(self, index):
        self.calls += 1
        return list.__getitem__(self, (self.calls - 1) % len(self))


@FAST
@given(parts=st.lists(samples(min_rects=1, max_rects=1), min_size=4, max_size=4), seed=st.integers(0, 2**31))
def test_mosaic_affine_dataset_boxes_follow_pixels(parts, seed):
    parts = [(np.where(img.any(-1, keepdims=True), COLOURS[k], 0).astype(np.uint8), {**t, 'labels': np.array([k])})
             for k, (img, t) in enumerate(parts)]
    random.seed(seed)
    ds = MosaicMixupDataset(InTurn(parts), 64, transforms=Compose([]), enable_mixup=False, mosaic_scale=(0.5, 1.5))
    out, tgt = ds[0]
    assert out.shape == (64, 64, 3)
    assert_boxes_follow(out, tgt)


@FAST
@given(sample=samples(min_rects=1), scale=st.floats(0.5, 1.5), flip=st.booleans(), seed=st.integers(0, 2**31))
def test_mixup_boxes_follow_pixels(sample, scale, flip, seed):
    """Blend onto a black, box-free image: the other sample's colours appear halved."""
    other_image, other_target = sample
    random.seed(seed)
    black = np.zeros((96, 96, 3), np.uint8)
    primary = make_target(np.zeros((0, 4)), [], (96, 96))
    out, tgt = mixup(black, primary, other_image, other_target, scale, flip)
    assert out.shape == (96, 96, 3)
    assert_boxes_follow(out, tgt, colours=COLOURS // 2, tight_slack=tight_slack(other_image, out, 1.5 * 2.4))


def test_mixup_keeps_primary_boxes():
    image = np.full((64, 64, 3), 200, np.uint8)
    primary = make_target([[1, 2, 30, 40]], [2], (64, 64))
    other = make_target([[0, 0, 32, 32]], [1], (64, 64))
    out, tgt = mixup(image, primary, np.zeros((64, 64, 3), np.uint8), other, 1.0, False)
    np.testing.assert_array_equal(tgt['boxes'][0], [1, 2, 30, 40])
    assert tgt['labels'].tolist() == [2, 1]
    assert (out == 100).all()  # (200 + 0) // 2


@pytest.mark.parametrize('transform', [RandomPhotometricDistort(p=1.0), RandomHSV(p=1.0)], ids=['photometric', 'hsv'])
@FAST
@given(sample=samples(), seed=st.integers(0, 2**31))
def test_photometric_transforms_do_not_move_boxes(transform, sample, seed):
    image, target = sample
    random.seed(seed)
    out, tgt = transform(image, target)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(tgt['boxes'], target['boxes'])
    np.testing.assert_array_equal(tgt['labels'], target['labels'])


@pytest.mark.parametrize('pipeline', [detr_transforms(False), yolox_transforms(False, 96), dfine_transforms(False, 96)],
                         ids=['detr', 'yolox', 'dfine'])
@settings(max_examples=5, deadline=None, database=None)
@given(sample=samples(min_side=40, max_side=100))
def test_eval_pipelines_are_deterministic(pipeline, sample):
    image, target = sample
    random.seed(1); x1, t1 = pipeline(image, target)
    random.seed(2); x2, t2 = pipeline(image, target)
    assert torch.equal(x1, x2) and torch.equal(t1['boxes'], t2['boxes'])


def test_yolox_eval_is_official_letterbox_bgr():
    """The official preprocessing, written out by hand: BGR, 0-255, top-left paste on 114."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)
    x, _ = yolox_transforms(False, 64)(image, make_target(np.zeros((0, 4)), [], (50, 80)))
    import cv2
    expected = np.full((64, 64, 3), 114, np.float32)
    expected[:40, :64] = cv2.resize(image, (64, 40), interpolation=cv2.INTER_LINEAR)  # r = 0.8
    torch.testing.assert_close(x, torch.from_numpy(expected[..., ::-1].transpose(2, 0, 1).copy()))
    assert letterbox(image, 64)[1] == pytest.approx(0.8)


def empty_sample(h=60, w=90):
    return np.full((h, w, 3), 50, np.uint8), make_target(np.zeros((0, 4)), [], (h, w))


@pytest.mark.parametrize('name', list(GEOMETRIC))
def test_empty_targets_pass_through(name):
    random.seed(0)
    out, tgt = GEOMETRIC[name](*empty_sample())
    assert tgt['boxes'].shape == (0, 4) and tgt['labels'].shape == (0,) and tuple(tgt['size']) == out.shape[:2]


def test_empty_targets_pass_through_pipelines_and_mixing():
    random.seed(0)
    for pipe in [detr_transforms(True), yolox_transforms(True, 64), dfine_transforms(True, 64),
                 Compose([RandomPhotometricDistort(p=1.0), RandomHSV(p=1.0)])]:
        for _ in range(3):
            _, tgt = pipe(*empty_sample())
            assert tuple(tgt['boxes'].shape) == (0, 4) and len(tgt['labels']) == 0
    canvas, tgt = mosaic([empty_sample()] * 4, 64, (64, 64))
    assert canvas.shape == (128, 128, 3) and tgt['boxes'].shape == (0, 4)
    _, tgt = mixup(*empty_sample(64, 64), *empty_sample(), 1.2, True)
    assert tgt['boxes'].shape == (0, 4)
    x, tgt = MosaicMixupDataset([empty_sample()] * 3, 64)[0]
    assert x.shape == (3, 64, 64) and tgt['boxes'].shape == (0, 4)


def test_to_tensor_contract():
    image, target = empty_sample()
    x, t = ToTensor()(image, {**target, 'boxes': np.array([[1, 2, 3, 4]], np.float32), 'labels': np.array([5])})
    assert x.dtype == torch.float32 and x.shape == (3, 60, 90) and x.max() <= 1
    assert t['boxes'].dtype == torch.float32 and t['labels'].dtype == torch.int64
    assert t['size'].tolist() == [60, 90] and t['orig_size'].dtype == torch.int64


def test_bad_inputs_have_clear_messages():
    image, target = empty_sample()
    with pytest.raises(DetlearnError, match='RGB uint8 numpy image'):
        detr_transforms(False)(image[..., 0], target)
    with pytest.raises(DetlearnError, match="needs 'boxes' and 'labels'"):
        detr_transforms(False)(image, {'image_id': 4})
    with pytest.raises(DetlearnError, match='transforms=None'):
        MosaicMixupDataset(type('WithTransforms', (list,), {'transforms': print})(), 64)


def test_stop_epoch_switch():
    pipe = dfine_transforms(True, 64, stop_epoch=10)
    assert isinstance(pipe, StopEpochCompose)
    pipe.set_epoch(9); assert pipe.strong_enabled
    pipe.set_epoch(10); assert not pipe.strong_enabled
    image = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    _, target = empty_sample(40, 50)
    expected, _ = dfine_transforms(False, 64)(image, target)
    for seed in range(5):  # only the flip is left
        random.seed(seed)
        x, _ = pipe(image, target)
        assert torch.equal(x, expected) or torch.equal(x, expected.flip(-1))
    ds = MosaicMixupDataset([(image, make_target([[5, 5, 20, 20]], [0], (40, 50)))], 64, transforms=Compose([]))
    ds.close_mosaic()
    out, tgt = ds[0]
    assert out is image  # raw sample, no mosaic


def test_detr_and_dfine_eval_are_bit_exact_with_torchvision():
    """DETR/DINO: PIL resize to 800 (max 1333), to_tensor, ImageNet normalize; D-FINE: v2 Resize 640x640, ToDtype."""
    import torchvision.transforms.functional as F1
    import torchvision.transforms.v2 as T2
    from PIL import Image
    image = np.random.default_rng(2).integers(0, 256, (300, 451, 3), dtype=np.uint8)
    _, target = empty_sample(300, 451)
    pil = Image.fromarray(image)
    detr_ref = F1.normalize(F1.to_tensor(F1.resize(pil, [800, 1202])), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert torch.equal(detr_transforms(False)(image, target)[0], detr_ref)  # 451 * 800 / 300 = 1202.7 -> 1202
    dfine_ref = T2.Compose([T2.Resize([640, 640]), T2.PILToTensor(), T2.ToDtype(torch.float32, scale=True)])(pil)
    assert torch.equal(dfine_transforms(False)(image, target)[0], dfine_ref)


def test_letterbox_and_mixup_boxes_use_the_true_scale():
    """int(147 * (96/147)) == 95: content is 95 px wide, so boxes must scale by 95/147, not by r (found by hypothesis)."""
    image = np.zeros((40, 147, 3), np.uint8)
    image[0:8, 118:126] = COLOURS[1]
    target = make_target([[118, 0, 126, 8]], [1], (40, 147))
    out, tgt = Letterbox(96)(image, target)
    assert_boxes_follow(out, tgt, slack=0.5, tight_slack=1.0)
    random.seed(0)
    out, tgt = mixup(np.zeros((96, 96, 3), np.uint8), make_target(np.zeros((0, 4)), [], (96, 96)), image, target, 1.0, False)
    assert_boxes_follow(out, tgt, colours=COLOURS // 2, slack=0.5, tight_slack=1.0)
    canvas, tgt = mosaic([(image, target)] * 4, 96, (96, 96))
    assert_boxes_follow(canvas, tgt, slack=0.5)
