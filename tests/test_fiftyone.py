"""FiftyOne integration on the bundled `shapes` sample: ground truth scored as predictions gives mAP 1.0 in
FiftyOne's COCO evaluation; a wrong class and a box on background are false positives (and the missed
object a false negative); each prediction carries its matched COCO annotation id; re-running with a name
replaces that dataset only; the CLI builds a persistent dataset; and the App, served on loopback, opens in
headless Chromium showing the sample count and the `predictions` field (screenshot in test-artifacts/).

FiftyOne keeps its database in a temporary folder (FIFTYONE_DATABASE_DIR, set before the first import).
Without fiftyone (or Chromium/playwright for the browser test) the tests skip on a workstation and FAIL in CI.
Run alone: `pytest tests/test_fiftyone.py` (about a minute on 2 idle cores; the mongod start is most of it).
"""
import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import missing
from detlearn.data.samples import sample_dataset
from detlearn.utils import DetlearnError

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / 'test-artifacts'
CHROMIUM = Path(os.environ.get('DETLEARN_CHROMIUM', '/usr/bin/chromium'))
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync', '--no-first-run']
pytestmark = pytest.mark.xdist_group('fiftyone')  # one mongod per worker is enough


@pytest.fixture(scope='module')
def shapes():
    ann, images = sample_dataset('shapes', 'val')
    return ann, images, json.loads(Path(ann).read_text())


def test_ground_truth_as_predictions_is_perfect(fo, shapes):
    from detlearn.integrations.fiftyone import to_fiftyone
    ann, images, coco = shapes
    ds = to_fiftyone(ann, images, predictions=[a | {'score': 1.0} for a in coco['annotations']], name='t-perfect')
    assert len(ds) == len(coco['images'])
    assert ds.info['mAP'] == pytest.approx(1.0)
    assert ds.count_values('predictions.detections.eval') == {'tp': len(coco['annotations'])}
    assert sum(ds.values('eval_fn')) == 0 and sum(ds.values('eval_fp')) == 0
    names = {c['id']: c['name'] for c in coco['categories']}
    assert sorted(ds.distinct('ground_truth.detections.label')) == sorted(set(names.values()))
    sample = ds.match(fo.ViewField('coco_id') == coco['images'][0]['id']).first()
    first_ann = next(a for a in coco['annotations'] if a['image_id'] == coco['images'][0]['id'])
    gt = next(d for d in sample.ground_truth.detections if d['coco_id'] == first_ann['id'])
    w, h = coco['images'][0]['width'], coco['images'][0]['height']
    x, y, bw, bh = first_ann['bbox']
    assert gt.bounding_box == pytest.approx([x / w, y / h, bw / w, bh / h])
    assert gt.label == names[first_ann['category_id']]
    by_id = {a['id']: a for a in coco['annotations']}
    for d in sample.predictions.detections:  # each prediction matched the annotation it was made from
        x, y, bw, bh = by_id[d.eval_gt_coco_id]['bbox']
        assert d.bounding_box == pytest.approx([x / w, y / h, bw / w, bh / h])


def test_wrong_predictions_are_fp_and_fn(fo, shapes):
    from detlearn.integrations.fiftyone import to_fiftyone
    ann, images, coco = shapes
    image = coco['images'][0]
    anns = [a for a in coco['annotations'] if a['image_id'] == image['id']]
    assert len(anns) >= 3
    wrong_cat = next(c['id'] for c in coco['categories'] if c['id'] != anns[0]['category_id'])
    preds = [{'image_id': image['id'], 'category_id': wrong_cat, 'bbox': anns[0]['bbox'], 'score': 0.9},  # wrong class
             {'image_id': image['id'], 'category_id': anns[1]['category_id'], 'bbox': anns[1]['bbox'], 'score': 0.8},
             {'image_id': image['id'], 'category_id': anns[1]['category_id'], 'bbox': [0, 0, 2, 2], 'score': 0.7}]
    ds = to_fiftyone(ann, images, predictions=preds, name='t-wrong')
    sample = ds.match(fo.ViewField('coco_id') == image['id']).first()
    marks = [(d.eval, d.eval_gt_coco_id) for d in sample.predictions.detections]
    assert marks == [('fp', -1), ('tp', anns[1]['id']), ('fp', -1)]
    assert (sample.eval_tp, sample.eval_fp, sample.eval_fn) == (1, 2, len(anns) - 1)
    assert 0 < ds.info['mAP'] < 1
    with pytest.raises(DetlearnError, match='written for this dataset'):
        to_fiftyone(ann, images, predictions=[preds[0] | {'category_id': 99}], name='t-bad')


def test_same_name_replaces_that_dataset_only(fo, shapes):
    from detlearn.integrations.fiftyone import to_fiftyone
    ann, images, coco = shapes
    keep = to_fiftyone(ann, images, name='t-keep')
    to_fiftyone(ann, images, predictions=[a | {'score': 1.0} for a in coco['annotations'][:5]], name='t-replace')
    again = to_fiftyone(ann, images, predictions=[a | {'score': 1.0} for a in coco['annotations'][:2]], name='t-replace')
    assert again.count('predictions.detections') == 2
    assert fo.load_dataset('t-replace').count('predictions.detections') == 2
    assert fo.dataset_exists('t-keep') and len(fo.load_dataset('t-keep')) == len(keep)
    assert 'predictions' not in keep.get_field_schema()  # ground truth only: nothing to evaluate


def test_missing_fiftyone_names_the_extra(monkeypatch):
    from detlearn.integrations.fiftyone import import_fiftyone
    monkeypatch.setitem(sys.modules, 'fiftyone', None)
    with pytest.raises(DetlearnError, match=r'pip install "detlearn\[viz\] @ git\+https://github.com/detlearn/detlearn"'):
        import_fiftyone()


def test_cli_no_launch(fo, shapes, tmp_path, capsys):
    from detlearn.integrations.fiftyone import add_fiftyone_parser, cmd_fiftyone
    ann, images, coco = shapes
    (tmp_path / 'results.json').write_text(json.dumps([a | {'score': 1.0} for a in coco['annotations']]))
    parser = argparse.ArgumentParser(prog='detlearn')
    add_fiftyone_parser(parser.add_subparsers(dest='command'))
    args = parser.parse_args(['fiftyone', '--ann', str(ann), '--images', str(images), '--predictions',
                              str(tmp_path / 'results.json'), '--name', 't-cli', '--no-launch'])
    assert cmd_fiftyone(args) == 0
    assert capsys.readouterr().out == f"FiftyOne dataset 't-cli': {len(coco['images'])} images, FiftyOne COCO mAP 1.000\n"
    assert fo.load_dataset('t-cli').persistent
    both = parser.parse_args(['fiftyone', '--ann', str(ann), '--images', str(images), '--predictions', 'p.json',
                              '--checkpoint', 'c.pth', '--no-launch'])
    with pytest.raises(DetlearnError, match='not both'): cmd_fiftyone(both)


def test_checkpoint_predictions(fo, shapes, tmp_path):
    import torch
    from detlearn.integrations.fiftyone import to_fiftyone
    from detlearn.models import create
    from detlearn.train_utils import save_checkpoint
    ann, images, coco = shapes
    subset = coco | {'images': coco['images'][:3]}
    subset['annotations'] = [a for a in coco['annotations'] if a['image_id'] in {im['id'] for im in subset['images']}]
    (tmp_path / 'val3.json').write_text(json.dumps(subset))
    torch.manual_seed(0)
    net = create('yolox_nano', num_classes=4, cfg_overrides={'width': 0.125})
    for conv in [*net.head.obj_preds, *net.head.cls_preds]: torch.nn.init.zeros_(conv.bias)  # scores ~0.25: boxes to see
    names = [c['name'] for c in sorted(coco['categories'], key=lambda c: c['id'])]
    save_checkpoint({'model': net.state_dict(), 'class_names': names, 'cat_ids': [c['id'] for c in coco['categories']],
                     'format': 'detlearn-1', 'meta': {'model_name': 'yolox_nano', 'img_size': 256, 'num_classes': 4,
                                                      'model_overrides': {'width': 0.125}}}, tmp_path / 'c.pth')
    ds = to_fiftyone(tmp_path / 'val3.json', images, checkpoint=tmp_path / 'c.pth', name='t-ckpt')
    per_image = [len(d) for d in ds.values('predictions.detections')]
    assert 0 < max(per_image) <= 100  # the untrained model scores ~0.25 everywhere: capped at COCO's 100 per image
    assert set(ds.distinct('predictions.detections.label')) <= set(names)
    boxes = [box for per in ds.values('predictions.detections.bounding_box') for box in per]  # relative xywh
    assert all(0 <= x and 0 <= y and x + w <= 1 + 1e-6 and y + h <= 1 + 1e-6 for x, y, w, h in boxes)
    assert set(ds.distinct('predictions.detections.eval')) <= {'tp', 'fp'}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_app_in_headless_chromium(fo, shapes):
    if not CHROMIUM.exists(): missing(f'Chromium not found at {CHROMIUM} (apt-get install -y chromium)')
    try: from playwright.sync_api import sync_playwright
    except ImportError: missing('playwright is not installed (pip install playwright)')
    from detlearn.integrations.fiftyone import launch, to_fiftyone
    ann, images, coco = shapes
    ds = to_fiftyone(ann, images, predictions=[a | {'score': 1.0} for a in coco['annotations']], name='t-app')
    port = _free_port()
    session = launch(ds, port=port)
    assert session.url == f'http://127.0.0.1:{port}/' or session.url.startswith(f'http://127.0.0.1:{port}')
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_page(viewport={'width': 1280, 'height': 800})
        try:
            page.goto(session.url, timeout=120_000)
            page.get_by_text('predictions', exact=True).first.wait_for(timeout=120_000)
            page.get_by_text(f"{len(coco['images'])} samples").first.wait_for(timeout=60_000)
            dismiss = page.get_by_text('Dismiss', exact=True)
            if dismiss.count(): dismiss.first.click()  # the App's advertising pop-up
            page.wait_for_timeout(2000)  # thumbnails
            page.screenshot(path=str(ARTIFACTS / 'fiftyone_app.png'))
            body = page.inner_text('body')
            assert 'ground_truth' in body and 'eval_fp' in body  # the label field and the evaluation counts
            assert 't-app' in page.content()  # the dataset's name (in the header's dataset picker)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / 'fiftyone_failure.png'), full_page=True)
            raise
        finally:
            browser.close()
