"""YOLOX presets against the official model's facts (tests/data/yolox_reference.json.gz) and its algorithms."""
import gzip
import json
import math
from pathlib import Path

import pytest
import torch
import torchvision

from detlearn.models import create, list_models, model_info
from detlearn.models.yolox import yolox_postprocess
from detlearn.utils import DetlearnError

pytestmark = pytest.mark.cpu_path  # run again on the other CPU path by tools/test.sh

REFERENCE = json.loads(gzip.decompress((Path(__file__).parent / 'data/yolox_reference.json.gz').read_bytes()))
PRESETS = ['yolox_nano', 'yolox_tiny', 'yolox_s', 'yolox_m', 'yolox_l', 'yolox_x']


@pytest.mark.parametrize('name', PRESETS)
def test_preset_matches_official_names_shapes_params_and_flops(name):
    ref = REFERENCE[name]
    model = create(name)
    assert sum(p.numel() for p in model.parameters()) == ref['num_params']
    ours = [[k, list(v.shape), str(v.dtype).removeprefix('torch.')] for k, v in model.state_dict().items()]
    assert ours == ref['state_dict']  # same names, shapes, dtypes, in the official order
    info = model_info(model, 640)
    assert info['params'] == ref['num_params']
    assert abs(info['gflops'] / ref['gflops_640'] - 1) < 0.01, (info, ref['gflops_640'])


def test_create_errors_and_overrides():
    assert list_models()[:6] == PRESETS
    with pytest.raises(DetlearnError, match='available models: yolox_nano'):
        create('yolo_s')
    with pytest.raises(DetlearnError, match='valid fields'):
        create('yolox_s', cfg_overrides={'nms': 0.5})
    m = create('yolox_nano', num_classes=5, cfg_overrides={'nms_thre': 0.5})
    assert m.cfg.nms_thre == 0.5 and m.head.cls_preds[2].out_channels == 5


def test_forward_layout_and_decoding_by_hand():
    torch.manual_seed(0)
    model = create('yolox_nano', num_classes=4).eval()
    x = torch.rand(1, 3, 64, 96) * 255
    with torch.no_grad():
        out = model(x)
        maps = model.head(model.backbone(x))  # per level (1, 4+1+K, H, W) = [reg, obj, cls]
    assert [tuple(m.shape[-2:]) for m in maps] == [(8, 12), (4, 6), (2, 3)]
    n = 0
    for m, s in zip(maps, (8, 16, 32)):
        for row in range(m.shape[2]):
            for col in range(m.shape[3]):
                t = m[0, :, row, col]
                want = torch.cat([torch.stack([(t[0] + col) * s, (t[1] + row) * s, t[2].exp() * s, t[3].exp() * s]),
                                  t[4:].sigmoid()])
                torch.testing.assert_close(out['decoded'][0, n], want, rtol=1e-5, atol=1e-5)
                assert out['grids'][n].tolist() == [col, row] and out['strides'][n] == s
                n += 1
    assert n == out['decoded'].shape[1] == 126


def test_train_mode_outputs_carry_grad_but_decoded_does_not():
    model = create('yolox_nano', num_classes=2).train()
    out = model(torch.rand(2, 3, 64, 64) * 255)
    assert out['boxes'].requires_grad and out['cls_logits'].requires_grad and out['reg_raw'].requires_grad
    assert not out['decoded'].requires_grad
    assert model.use_l1 is False


def reference_postprocess(decoded, size_hw, input_hw, conf, nms):
    """The official algorithm written out directly (yolox.utils.postprocess, then / r and clip)."""
    p = decoded.clone()
    xyxy = torch.stack([p[:, 0] - p[:, 2] / 2, p[:, 1] - p[:, 3] / 2, p[:, 0] + p[:, 2] / 2, p[:, 1] + p[:, 3] / 2], 1)
    cls_conf, cls = p[:, 5:].max(1)
    score = p[:, 4] * cls_conf
    keep = score >= conf
    xyxy, score, cls = xyxy[keep], score[keep], cls[keep]
    idx = torchvision.ops.batched_nms(xyxy, score, cls, nms)
    r = min(input_hw[0] / size_hw[0], input_hw[1] / size_hw[1])
    b = xyxy[idx] / r
    b[:, 0::2] = b[:, 0::2].clamp(0, size_hw[1]); b[:, 1::2] = b[:, 1::2].clamp(0, size_hw[0])
    return b, score[idx], cls[idx]


def test_postprocess_matches_the_official_algorithm():
    g = torch.Generator().manual_seed(0)
    B, N, K = 3, 300, 5
    decoded = torch.cat([torch.rand(B, N, 2, generator=g) * 128, torch.rand(B, N, 2, generator=g) * 40 + 2,
                         torch.rand(B, N, 1 + K, generator=g)], -1)
    sizes = torch.tensor([[480, 640], [640, 320], [100, 100]])
    dets = yolox_postprocess(decoded, sizes, (128, 128), conf_thre=0.3, nms_thre=0.45)
    for i in range(B):
        b, s, c = reference_postprocess(decoded[i], sizes[i].tolist(), (128, 128), 0.3, 0.45)
        assert len(b) > 5 and len(b) < N
        torch.testing.assert_close(dets[i]['boxes'], b)
        torch.testing.assert_close(dets[i]['scores'], s)
        assert torch.equal(dets[i]['labels'], c) and dets[i]['labels'].dtype == torch.int64


def test_bias_prior():
    m = create('yolox_s', num_classes=3)
    for conv in [*m.head.cls_preds, *m.head.obj_preds]:
        torch.testing.assert_close(conv.bias, torch.full_like(conv.bias, -math.log(99)))


def test_loss_through_the_model_and_use_l1():
    torch.manual_seed(0)
    model = create('yolox_nano', num_classes=3).train()
    x = torch.rand(1, 3, 64, 64) * 255
    targets = [dict(boxes=torch.tensor([[4., 8, 40, 50]]), labels=torch.tensor([2]))]
    losses = model.loss(model(x), targets)
    assert {'loss', 'loss_iou', 'loss_obj', 'loss_cls', 'loss_l1', 'num_fg'} <= set(losses)
    assert float(losses['loss_l1']) == 0 and float(losses['num_fg']) > 0
    model.use_l1 = True
    losses = model.loss(model(x), targets)
    assert float(losses['loss_l1']) > 0
    torch.testing.assert_close(losses['loss'], losses['loss_iou'] + losses['loss_obj'] + losses['loss_cls'] + losses['loss_l1'])
    assert list(model.state_dict()) == [k for k, _, _ in REFERENCE['yolox_nano']['state_dict']]


def randomise_batchnorm(model, seed=0):
    """Running statistics and affine values a trained network could have (a fresh BN is the identity map)."""
    g = torch.Generator().manual_seed(seed)
    for bn in [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
        n = bn.num_features
        bn.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
        bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
        bn.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
        bn.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


@pytest.mark.parametrize('bias,groups,stride', [(False, 1, 1), (True, 4, 2)])
def test_fold_conv_bn_matches_torch_reference(bias, groups, stride):
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    from detlearn.models.yolox import fold_conv_bn
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 12, 3, stride, 1, groups=groups, bias=bias)
    bn = randomise_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(12)))[0].eval()
    ours, ref = fold_conv_bn(conv, bn), fuse_conv_bn_eval(conv.eval(), bn)
    torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.bias, ref.bias, rtol=1e-6, atol=1e-7)
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(ours(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name,channels_last', [('yolox_s', True), ('yolox_nano', False)])
def test_fused_model_equals_unfused_and_refuses_training(name, channels_last):
    torch.manual_seed(0)
    keep_all = {'conf_thre': 0.0}  # random weights score ~1e-4: keep every box, let NMS decide
    model = randomise_batchnorm(create(name, num_classes=6, cfg_overrides=keep_all)).eval()
    unfused = create(name, num_classes=6, cfg_overrides=keep_all)
    unfused.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 96, 128) * 255
    with torch.no_grad():
        want = unfused.eval()(x)
        assert model.fuse(channels_last) is model and model.fuse(channels_last) is model  # idempotent
        got = model(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model.channels_last is channels_last and not model.training
    d = want['decoded']
    torch.testing.assert_close(got['decoded'], d, rtol=1e-4, atol=1e-4 * float(d.abs().max()))
    sizes = torch.tensor([[480, 640], [96, 128]])
    for a, b in zip(model.postprocess(got, sizes), unfused.postprocess(want, sizes)):
        assert a['boxes'].shape == b['boxes'].shape and len(a['boxes']) > 0
        # random weights give near-equal scores and near-duplicate boxes: rows may swap, and NMS may keep a
        # neighbour (< 1 px away) of a box instead; match each detection to the nearest of the other list
        assert torch.equal(a['labels'].sort().values, b['labels'].sort().values)
        dist = torch.cdist(a['boxes'], b['boxes']) + 1e3 * (a['labels'][:, None] != b['labels'][None])  # (M, M)
        assert dist.min(1).values.max() < 1 and dist.min(0).values.max() < 1
    with pytest.raises(DetlearnError, match='cannot train'):
        model.train()
    with pytest.raises(RuntimeError, match='Unexpected key'):
        unfused.load_state_dict(model.state_dict())  # documented: fused weights do not load into an unfused model
    assert unfused.train().training  # an unfused model still trains
