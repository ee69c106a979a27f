"""ONNX export of each DETR family on a small config: the DETR deployment contract, checked against onnxruntime."""
import numpy as np
import pytest
import torch

from detlearn.export import export_onnx, run_onnx
from detlearn.models import create, family_of

pytestmark = pytest.mark.xdist_group('export_families')
pytest.importorskip('onnxruntime')


def small(preset, overrides):
    torch.manual_seed(0)
    return create(preset, num_classes=3, cfg_overrides=overrides).eval()


@pytest.mark.parametrize('preset, overrides, size', [
    ('dino_4scale_r50', {'resnet_depths': (1, 1, 1, 1), 'resnet_width': 8, 'hidden_dim': 64, 'enc_layers': 1,
                         'dec_layers': 1, 'num_queries': 20}, (96, 128)),
    ('dfine_n', {}, (320, 320)),
])
def test_detr_family_exports_with_the_detr_contract(tmp_path, preset, overrides, size):
    model = small(preset, overrides)
    model = family_of(model).fuse(model)  # the inference structure (D-FINE: deploy)
    report = export_onnx(model, tmp_path / f'{preset}.onnx', img_size=size, top_k=10)
    assert report.contract == 'detr'
    images = torch.rand(2, 3, *size)
    sizes = torch.tensor([[640, 480], [320, 240]])  # (w, h) of the originals
    labels, boxes, scores = run_onnx(tmp_path / f'{preset}.onnx',
                                     {'images': images.numpy(), 'orig_target_sizes': sizes.numpy()})
    assert labels.shape == (2, 10) and boxes.shape == (2, 10, 4) and scores.shape == (2, 10)
    with torch.no_grad():
        ref = model.postprocess(model(images), sizes.flip(1))  # postprocess takes (h, w)
    for b in range(2):
        np.testing.assert_allclose(scores[b], ref[b]['scores'][:10].numpy(), rtol=1e-3, atol=1e-4)
    assert (boxes[1, :, 2] <= 320 + 1e-3).all() and (boxes[1, :, 3] <= 240 + 1e-3).all()  # original pixels
