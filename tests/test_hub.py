"""Official-checkpoint loading: an official-layout file made from detlearn's own model, and its corruptions."""
import argparse
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn

from detlearn import hub
from detlearn.models.yolox.family import official_preprocess
from detlearn.models import create
from detlearn.utils import DetlearnError


@pytest.fixture(scope='module')
def source():
    torch.manual_seed(0)
    model = create('yolox_nano').eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d): m.running_mean.normal_(0, 0.2); m.running_var.uniform_(0.5, 2)
    return model


def save_official(tmp_path, state_dict, name='ckpt.pth', wrap=True):
    """The official trainer's layout (yolox/core/trainer.py save_ckpt)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1, momentum=0.9)
    ckpt = {'start_epoch': 300, 'model': state_dict, 'optimizer': opt.state_dict(), 'best_ap': 25.8, 'curr_ap': 25.1}
    torch.save(ckpt if wrap else state_dict, tmp_path / name)
    return tmp_path / name


def test_round_trip_gives_identical_outputs(tmp_path, source):
    path = save_official(tmp_path, source.state_dict())
    model = hub.load_official('yolox_nano', path)
    assert not model.training
    x = torch.rand(2, 3, 96, 64) * 255
    with torch.no_grad():
        assert torch.equal(model(x)['decoded'], source(x)['decoded'])
    for k, v in source.state_dict().items():  # every tensor, BN statistics and counters included
        assert torch.equal(model.state_dict()[k], v), k


def test_bare_state_dict_and_ddp_prefix(tmp_path, source):
    sd = {'module.' + k: v for k, v in source.state_dict().items()}
    model = hub.load_official('yolox_nano', save_official(tmp_path, sd, wrap=False))
    assert torch.equal(model.head.reg_preds[0].weight, source.head.reg_preds[0].weight)


@pytest.mark.parametrize('corrupt, message', [
    (lambda sd: {**sd, 'head.extra.weight': torch.zeros(2)}, 'unexpected tensors (1): head.extra.weight'),
    (lambda sd: {k: v for k, v in sd.items() if k != 'backbone.C3_n4.conv3.bn.running_var'},
     'missing tensors (1): backbone.C3_n4.conv3.bn.running_var'),
    (lambda sd: {**sd, 'backbone.backbone.stem.conv.conv.weight': torch.zeros(16, 3, 3, 3)},
     'backbone.backbone.stem.conv.conv.weight (16, 3, 3, 3) vs (16, 12, 3, 3)'),
])
def test_corrupted_checkpoints_fail_naming_the_tensor(tmp_path, source, corrupt, message):
    path = save_official(tmp_path, corrupt(source.state_dict()))
    with pytest.raises(DetlearnError) as e:
        hub.load_official('yolox_nano', path)
    assert message in str(e.value)


def test_wrong_preset_pickled_objects_and_missing_file(tmp_path, source):
    path = save_official(tmp_path, source.state_dict())
    with pytest.raises(DetlearnError, match='Is it a checkpoint of this preset'):
        hub.load_official('yolox_s', path)
    torch.save({'model': source.state_dict(), 'args': argparse.Namespace(lr=1)}, tmp_path / 'ns.pth')
    assert hub.load_official('yolox_nano', tmp_path / 'ns.pth').cfg.num_classes == 80  # Namespace: allow-listed
    torch.save({'model': source.state_dict(), 'work_dir': Path('runs')}, tmp_path / 'obj.pth')
    with pytest.raises(DetlearnError, match='could not read checkpoint .*obj.pth'):
        hub.load_official('yolox_nano', tmp_path / 'obj.pth')
    with pytest.raises(DetlearnError, match='does not exist'):
        hub.load_official('yolox_nano', tmp_path / 'missing.pth')
    torch.save({'epoch': 3}, tmp_path / 'other.pth')
    with pytest.raises(DetlearnError, match="not an official YOLOX checkpoint: expected the weights under 'model'"):
        hub.load_official('yolox_nano', tmp_path / 'other.pth')


def test_other_class_count_reinitialises_only_cls_preds(tmp_path, source, caplog):
    sd = source.state_dict()
    model = hub.load_official('yolox_nano', save_official(tmp_path, sd), num_classes=7)
    assert model.cfg.num_classes == 7 and model.head.cls_preds[1].weight.shape[0] == 7
    assert 'head.cls_preds.2.bias' in caplog.text
    skipped = hub.load_official_state_dict(create('yolox_nano', num_classes=7), sd)
    assert skipped == [f'head.cls_preds.{i}.{p}' for i in range(3) for p in ('weight', 'bias')]
    for k, v in model.state_dict().items():
        if k not in skipped: assert torch.equal(v, sd[k]), k


def official_preproc(img_bgr, size):
    """yolox.data.data_augment.preproc, written out: top-left letterbox on a 114 canvas, int() sizes, HWC->CHW."""
    padded = np.ones((size[0], size[1], 3), np.uint8) * 114
    r = min(size[0] / img_bgr.shape[0], size[1] / img_bgr.shape[1])
    resized = cv2.resize(img_bgr, (int(img_bgr.shape[1] * r), int(img_bgr.shape[0] * r)), interpolation=cv2.INTER_LINEAR)
    padded[: int(img_bgr.shape[0] * r), : int(img_bgr.shape[1] * r)] = resized
    return np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32), r


@pytest.mark.parametrize('hw', [(37, 91), (120, 50), (64, 64)])
def test_official_preprocess_matches_the_official_recipe(hw):
    rng = np.random.default_rng(0)
    img_bgr = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    want, r_want = official_preproc(img_bgr, (64, 96))
    x, r = official_preprocess(img_bgr[..., ::-1], (64, 96))  # given RGB
    assert r == r_want and torch.equal(x[0], torch.from_numpy(want))
    x_bgr, _ = official_preprocess(img_bgr, (64, 96), channels='bgr')
    assert torch.equal(x_bgr, x)
    legacy, _ = official_preprocess(img_bgr, (64, 96), legacy=True, channels='bgr')
    ref = want[::-1] / 255.0  # legacy ValTransform: RGB, /255, ImageNet mean/std
    ref = (ref - np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1)) / np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1)
    torch.testing.assert_close(legacy[0], torch.from_numpy(ref.astype(np.float32)), rtol=1e-5, atol=1e-5)
