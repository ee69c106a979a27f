"""ONNX export: the official deployment contracts, read back with onnxruntime.

* YOLOX (tools/export_onnx.py of Megvii-BaseDetection/YOLOX): input `images`, output `output` (B, N, 5+K) with raw
  box numbers and sigmoid scores; decoding it the way YOLOX's ONNX demo does (grids × strides, numpy) must give
  the model's own decoded boxes. `decode=True` writes the decoded form.
* DETR (tools/deployment/export_onnx.py of Peterande/D-FINE): inputs `images`, `orig_target_sizes` (w, h),
  outputs `labels`, `boxes`, `scores`; checked against the independent per-pair postprocess of `FakeDETR`.
* `cmd_export` on a trainer-format checkpoint and on official-layout weights; bad command lines.
"""
import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fake_detr import FakeDETR  # noqa: E402

from detlearn.export import (YOLOXOnnx, add_export_parser, cmd_export, compare_outputs, example_inputs,  # noqa: E402
                             export_onnx, run_onnx)
from detlearn.models import create  # noqa: E402
from detlearn.utils import DetlearnError  # noqa: E402

pytestmark = pytest.mark.cpu_path  # run again on the other CPU path by tools/test.sh

NAMES = ['circle', 'square', 'triangle', 'star']


def yolox_demo_decode(output: np.ndarray, img_size: tuple, strides=(8, 16, 32)) -> np.ndarray:
    """YOLOX's demo_postprocess (demo/ONNXRuntime), re-typed: (t_xy + grid)·s and exp(t_wh)·s."""
    grids, expanded = [], []
    for s in strides:
        xv, yv = np.meshgrid(np.arange(img_size[1] // s), np.arange(img_size[0] // s))
        grids.append(np.stack((xv, yv), 2).reshape(1, -1, 2))
        expanded.append(np.full((1, grids[-1].shape[1], 1), s))
    grids, expanded = np.concatenate(grids, 1), np.concatenate(expanded, 1)
    out = output.copy()
    out[..., :2] = (out[..., :2] + grids) * expanded
    out[..., 2:4] = np.exp(out[..., 2:4]) * expanded
    return out


@pytest.fixture(scope='module')
def yolox():
    torch.manual_seed(0)
    return create('yolox_nano', num_classes=4, cfg_overrides={'width': 0.125}).eval()


def _io(path):
    proto = onnx.load(str(path))
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input]
    return [i.name for i in proto.graph.input], [o.name for o in proto.graph.output], dims, proto


def test_yolox_contract(yolox, tmp_path):
    report = export_onnx(yolox, tmp_path / 'y.onnx', img_size=(96, 128), class_names=NAMES)
    inputs, outputs, dims, proto = _io(report.path)
    assert (inputs, outputs) == (['images'], ['output'])
    assert dims == [['batch', 3, 96, 128]]
    assert proto.opset_import[0].version == 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta['detlearn_contract'] == 'yolox' and 'triangle' in meta['class_names']
    x = torch.rand(3, 3, 96, 128) * 255  # batch 3: the file was traced with 1
    (raw,) = run_onnx(report.path, {'images': x.numpy()})
    with torch.no_grad(): out = yolox(x)
    assert raw.shape == (3, 12 * 16 + 6 * 8 + 3 * 4, 9)
    np.testing.assert_allclose(yolox_demo_decode(raw, (96, 128)), out['decoded'].numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(raw[..., 4], out['obj_logits'].sigmoid().numpy(), atol=1e-4)


def test_yolox_decode(yolox, tmp_path):
    report = export_onnx(yolox, tmp_path / 'd.onnx', img_size=64, decode=True, opset=16)
    x = torch.rand(2, 3, 64, 64) * 255
    (decoded,) = run_onnx(report.path, {'images': x.numpy()})
    with torch.no_grad(): expected = yolox(x)['decoded'].numpy()
    np.testing.assert_allclose(decoded, expected, rtol=1e-3, atol=1e-3)
    assert onnx.load(str(report.path)).opset_import[0].version == 16


def test_detr_contract(tmp_path):
    torch.manual_seed(0)
    model = FakeDETR(num_classes=3, num_queries=6, num_top_queries=10).eval()
    report = export_onnx(model, tmp_path / 'detr.onnx', img_size=(64, 96), top_k=10)
    inputs, outputs, dims, _ = _io(report.path)
    assert (inputs, outputs) == (['images', 'orig_target_sizes'], ['labels', 'boxes', 'scores'])
    assert dims == [['batch', 3, 64, 96], ['batch', 2]]
    images, sizes_hw = torch.randn(3, 3, 64, 96), torch.tensor([[480, 640], [200, 100], [64, 96]])
    labels, boxes, scores = run_onnx(report.path, {'images': images.numpy(), 'orig_target_sizes': sizes_hw.flip(-1).numpy()})
    with torch.no_grad(): ref = model.postprocess(model(images), sizes_hw)
    assert labels.dtype == np.int64 and labels.shape == (3, 10) and boxes.shape == (3, 10, 4)
    for b in range(3):
        np.testing.assert_allclose(scores[b], ref[b]['scores'].numpy(), atol=1e-5)
        np.testing.assert_array_equal(labels[b], ref[b]['labels'].numpy())
        np.testing.assert_allclose(boxes[b], ref[b]['boxes'].numpy(), rtol=1e-4, atol=1e-3)


def test_detr_check_catches_a_frozen_value(tmp_path):
    class Frozen(FakeDETR):
        def forward(self, images, masks=None, targets=None):
            out = super().forward(images)
            return out | {'pred_logits': out['pred_logits'] + float(images[0, 0, 0, 0])}
    torch.manual_seed(0)
    with pytest.raises(DetlearnError, match=r'beyond rel=0.001 on .* at \[\d+, \d+\].*--rel.*--no-check') as err:
        export_onnx(Frozen().eval(), tmp_path / 'f.onnx', img_size=64)
    assert 'kept' in str(err.value) and (tmp_path / 'f.onnx').exists()  # the file stays, for inspection
    report = export_onnx(Frozen().eval(), tmp_path / 'f2.onnx', img_size=64, check=False)
    assert report.checks == [] and 'not checked' in report.summary()
    with pytest.raises(DetlearnError, match='decode=True'):
        export_onnx(FakeDETR().eval(), tmp_path / 'g.onnx', img_size=64, decode=True)


def test_yolox_check_is_scaled_to_each_output(yolox, tmp_path):
    # Box numbers in the hundreds (as trained or perturbed weights give) pass; each part has its own scale.
    big = copy.deepcopy(yolox)
    with torch.no_grad():
        for conv in big.head.reg_preds: conv.weight.mul_(300.0); conv.bias.add_(400.0)
    report = export_onnx(big, tmp_path / 'big.onnx', img_size=64)
    boxes, probs = report.checks
    assert boxes.name == 'output[..., :4]' and boxes.scale > 100 and boxes.ok and probs.ok
    assert 'output[..., :4]' in report.summary() and 'allowed 0.001' in report.summary()
    x = example_inputs('yolox', 2, (64, 64), seed=1)[0]
    with torch.no_grad(): want = YOLOXOnnx(big)(x).numpy()
    # 8.55e-3 on a box number near zero, in an output of scale 400: the false alarm of an elementwise atol
    i = (0, 5, 1)
    want[i] = 0.0; got = want.copy(); got[i] = 8.55e-3  # a box number near zero, off by 8.55e-3
    assert abs(got[i] - want[i]) > 1e-3 + 1e-3 * abs(want[i])  # what an elementwise atol/rtol refused
    assert all(c.ok for c in compare_outputs(('output',), [got], [want]))
    # a wrong probability is named, element and values, although it is far smaller than the box numbers
    got = want.copy(); got[1, 7, 6] += 0.05
    worst = compare_outputs(('output',), [got], [want])[1]
    assert not worst.ok and worst.index == (1, 7, 2) and 'PyTorch' in worst.line()


def _parse(*argv):
    parser = argparse.ArgumentParser(prog='detlearn')
    add_export_parser(parser.add_subparsers(dest='command'))
    return parser.parse_args(['export', *argv])


def test_cmd_export_checkpoint(yolox, tmp_path, capsys):
    from detlearn.train_utils import save_checkpoint
    ckpt = tmp_path / 'best.pth'
    save_checkpoint({'model': yolox.state_dict(), 'class_names': NAMES, 'cat_ids': [1, 3, 5, 7], 'format': 'detlearn-1',
                     'meta': {'model_name': 'yolox_nano', 'img_size': 64, 'num_classes': 4,
                              'model_overrides': {'width': 0.125}}}, ckpt)
    assert cmd_export(_parse('--checkpoint', str(ckpt), '--out', str(tmp_path / 'c.onnx'))) == 0
    assert 'max |diff|' in capsys.readouterr().out
    _, _, dims, proto = _io(tmp_path / 'c.onnx')
    assert dims == [['batch', 3, 64, 64]]  # the checkpoint's input size
    assert '"star"' in {p.key: p.value for p in proto.metadata_props}['class_names']


def test_cmd_export_official_weights(tmp_path):
    torch.manual_seed(0)
    reference = create('yolox_nano')
    torch.save({'model': reference.state_dict()}, tmp_path / 'yolox_nano.pth')  # YOLOX: official names = ours
    args = _parse('--model', 'yolox_nano', '--weights', str(tmp_path / 'yolox_nano.pth'), '--out',
                  str(tmp_path / 'o.onnx'), '--img-size', '64')
    assert cmd_export(args) == 0
    (raw,) = run_onnx(tmp_path / 'o.onnx', {'images': np.zeros((1, 3, 64, 64), np.float32)})
    assert raw.shape == (1, 8 * 8 + 4 * 4 + 2 * 2, 85)
    args = _parse('--model', 'yolox_nano', '--weights', str(tmp_path / 'yolox_nano.pth'), '--out',
                  str(tmp_path / 'n.onnx'), '--img-size', '64', '--no-check', '--rel', '0.01')
    assert (args.rel, args.no_check) == (0.01, True) and cmd_export(args) == 0 and (tmp_path / 'n.onnx').exists()


def test_cmd_export_mistakes(tmp_path):
    with pytest.raises(DetlearnError, match='give --checkpoint C'): cmd_export(_parse('--out', 'x.onnx'))
    with pytest.raises(DetlearnError, match='give --checkpoint C'):
        cmd_export(_parse('--checkpoint', 'a.pth', '--model', 'yolox_s', '--out', 'x.onnx'))
    with pytest.raises(DetlearnError, match='opset must be >= 16'):
        export_onnx(create('yolox_nano', 4, {'width': 0.125}), tmp_path / 'x.onnx', opset=11)
