"""The CPU preset `dino_tiny`: it learns (loss falls over 10 steps on 2 shapes images), and the whole CLI works for
DINO on a handful of shapes images: train, resume from the stored epoch, eval, predict. Tiny sizes, one thread."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detlearn.data.coco import CocoDetection
from detlearn.models.dino import DINO, DINO_PRESETS
from detlearn.models.dino.family import dino_eval_transforms

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / 'data_samples' / 'shapes'


def test_dino_tiny_loss_decreases():
    torch.manual_seed(0)
    cfg = DINO_PRESETS['dino_tiny'](4)
    ds = CocoDetection(SHAPES / 'train.json', SHAPES / 'train', dino_eval_transforms(cfg, 128))
    images, targets = zip(*(ds[i] for i in range(2)))
    images = torch.stack(images)  # the shapes images are square: no padding needed
    model = DINO(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    losses = []
    for _ in range(10):
        out = model(images, targets=list(targets))
        loss = sum(model.loss(out, list(targets)).values())
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def detlearn(*args, cwd, ok=True):
    env = os.environ | {'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'detlearn.cli', *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    if ok:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """1 epoch (of 2 planned) of dino_tiny_shapes at 128 px on 8 training and 4 validation images."""
    d = tmp_path_factory.mktemp('dino_cli')
    for split, n in (('train', 8), ('val', 4)):
        ann = json.loads((SHAPES / f'{split}.json').read_text())
        ann['images'] = ann['images'][:n]
        keep = {im['id'] for im in ann['images']}
        ann['annotations'] = [a for a in ann['annotations'] if a['image_id'] in keep]
        (d / f'{split}.json').write_text(json.dumps(ann))
    r = detlearn('train', '--recipe', 'dino_tiny_shapes', '--train-ann', d / 'train.json', '--train-images',
                 SHAPES / 'train', '--val-ann', d / 'val.json', '--val-images', SHAPES / 'val', '--epochs', 2,
                 '--img-size', 128, '--batch-size', 4, '--workers', 0, '--work-dir', 'run', '--no-progress',
                 'loop.eval_every=1', cwd=d)
    return d, r


def test_train_writes_checkpoint(run):
    d, r = run
    assert {'last.pth', 'best.pth', 'metrics.csv'} <= {p.name for p in (d / 'run').iterdir()}
    ck = torch.load(d / 'run' / 'last.pth', weights_only=True)
    assert ck['epoch'] == 2 and ck['cat_ids'] == [1, 3, 5, 7] and ck['meta']['img_size'] == 128


def test_resume_continues(run):
    d, _ = run
    shutil.copytree(d / 'run', d / 'run2')
    detlearn('train', '--recipe', 'dino_tiny_shapes', '--train-ann', d / 'train.json', '--train-images',
             SHAPES / 'train', '--epochs', 3, '--img-size', 128, '--batch-size', 4, '--workers', 0,
             '--work-dir', 'run2', '--no-progress', '-r', 'run2/last.pth', cwd=d)
    ck = torch.load(d / 'run2' / 'last.pth', weights_only=True)
    assert ck['epoch'] == 3 and len(ck['history']) == 3 and ck['step'] == 3 * 2  # 8 images / 4


def test_eval_and_predict(run):
    d, _ = run
    detlearn('eval', '--checkpoint', 'run/last.pth', '--ann', d / 'val.json', '--images', SHAPES / 'val',
             '--json', 'eval.json', cwd=d)
    stats = json.loads((d / 'eval.json').read_text())
    assert [row['category_id'] for row in stats['per_class']] == [1, 3, 5, 7]
    images = d / 'imgs'
    images.mkdir()
    shutil.copy(SHAPES / 'val' / '000001.jpg', images / '000001.jpg')
    detlearn('predict', '--checkpoint', 'run/last.pth', images, '--out', 'pred', cwd=d)
    results = json.loads((d / 'pred' / 'predictions.json').read_text())
    assert results and {r['category_id'] for r in results} <= {1, 3, 5, 7}
    assert {r['image_id'] for r in results} == {1}


def test_pipeline_and_onnx_export_of_the_trained_checkpoint(run):
    """The trained dino_tiny checkpoint in the pipeline (original pixels, the dataset's category ids) and as an ONNX
    file in the DETR contract whose onnxruntime scores equal the PyTorch model's."""
    pytest.importorskip('onnxruntime')
    import numpy as np
    from PIL import Image
    from detlearn import pipeline
    from detlearn.export import run_onnx
    d, _ = run
    image = SHAPES / 'val' / '000001.jpg'
    detector = pipeline('image-object-detection', model=d / 'run' / 'last.pth', device='cpu', score_threshold=0.0)
    out = detector(str(image))
    w, h = Image.open(image).size
    assert len(out['scores']) > 0 and set(out['labels']) <= {'circle', 'square', 'triangle', 'star'}
    boxes = np.asarray(out['boxes'])
    assert (boxes[:, [0, 2]] >= -1).all() and (boxes[:, [0, 2]] <= w + 1).all() and (boxes[:, 3] <= h + 1).all()
    detlearn('export', '--checkpoint', 'run/last.pth', '--out', 'dino_tiny.onnx', '--top-k', 20, cwd=d)
    model = detector.model
    x = torch.rand(1, 3, 128, 128)
    sizes = torch.tensor([[256, 256]])  # (w, h)
    labels, got_boxes, scores = run_onnx(d / 'dino_tiny.onnx', {'images': x.numpy(), 'orig_target_sizes': sizes.numpy()})
    with torch.no_grad():
        ref = model.postprocess(model(x), sizes.flip(1))[0]
    np.testing.assert_allclose(scores[0], ref['scores'][:20].numpy(), rtol=1e-3, atol=1e-4)
    assert labels.shape == (1, 20) and got_boxes.shape == (1, 20, 4)
