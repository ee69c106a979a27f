"""Inference pipeline: downloads from a local HTTP server (timeout, size limit), checkpoints without metadata."""
import functools
import http.server
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from detlearn.pipeline import download_image, pipeline
from detlearn.utils import DetlearnError


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass

    def do_GET(self):
        if self.path.startswith('/slow'): time.sleep(3)  # longer than the client's timeout
        super().do_GET()


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp('www')
    image = np.zeros((30, 40, 3), np.uint8); image[5:15, 10:30] = (255, 0, 0)
    Image.fromarray(image).save(folder / 'red.png')
    (folder / 'notes.txt').write_text('not an image')
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_Handler, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}', image
    httpd.shutdown()


def test_download_reads_the_same_pixels(server):
    url, image = server
    np.testing.assert_array_equal(download_image(f'{url}/red.png'), image)


def test_download_errors_are_clear(server):
    url, _ = server
    with pytest.raises(DetlearnError, match='larger than the 64 bytes'):
        download_image(f'{url}/red.png', max_bytes=64)
    with pytest.raises(DetlearnError, match='did not return a readable image'):
        download_image(f'{url}/notes.txt')
    with pytest.raises(DetlearnError, match='Could not download'):
        download_image(f'{url}/missing.png')
    start = time.perf_counter()
    with pytest.raises(DetlearnError, match='Could not download'):
        download_image(f'{url}/slow/red.png', timeout=0.5)
    assert time.perf_counter() - start < 2.5


def test_checkpoint_without_metadata_asks_for_the_preset(tmp_path):
    from detlearn.models import create
    path = tmp_path / 'official_like.pth'
    torch.save({'model': create('yolox_nano', num_classes=80).state_dict()}, path)
    with pytest.raises(DetlearnError, match="pass its preset too"):
        pipeline('image-object-detection', model=path, device='cpu')


def _checkpoint(tmp_path, preset, img_size, overrides=None):
    from detlearn.models import create
    from detlearn.train_utils import save_checkpoint
    torch.manual_seed(0)
    net = create(preset, num_classes=4, cfg_overrides=overrides)
    with torch.no_grad():  # spread the scores of the random heads, so that ties do not decide what NMS keeps
        for name, p in net.named_parameters():
            if 'cls_preds' in name or 'obj_preds' in name: p.add_(torch.randn_like(p) * 2)
    names = ['circle', 'square', 'triangle', 'star']
    path = tmp_path / f'{preset}.pth'
    save_checkpoint({'model': net.state_dict(), 'class_names': names, 'cat_ids': [1, 3, 5, 7], 'format': 'detlearn-1',
                     'meta': {'model_name': preset, 'img_size': img_size, 'num_classes': 4,
                              'model_overrides': overrides or {}}}, path)
    return path


@pytest.mark.parametrize('preset, size, overrides', [('yolox_nano', 128, {'width': 0.125, 'conf_thre': 1e-6}),
                                                        ('dfine_n', 256, None)])
def test_onnx_file_gives_the_checkpoints_detections(tmp_path, preset, size, overrides):
    """An exported file through the pipeline: the same preprocessing and postprocessing, so the same labels and
    boxes within 1 px as the .pth it came from (random weights, every detection kept)."""
    from detlearn.data.samples import sample_dataset
    from detlearn.cli import main
    ckpt = _checkpoint(tmp_path, preset, size, overrides)
    assert main(['export', '-c', str(ckpt), '--out', str(tmp_path / 'm.onnx')]) == 0
    _, images = sample_dataset('shapes', 'val')
    files = [str(p) for p in sorted(images.iterdir())[:3]]
    torch_pipe = pipeline('image-object-detection', model=ckpt, device='cpu', score_threshold=0.0)
    onnx_pipe = pipeline('image-object-detection', model=tmp_path / 'm.onnx', device='cpu', score_threshold=0.0)
    for a, b in zip(torch_pipe(files), onnx_pipe(files)):
        assert len(a['labels']) > 0 and len(a['labels']) == len(b['labels'])
        boxes_a, scores_a = np.array(a['boxes']), np.array(a['scores'])
        for label, box, score in list(zip(b['labels'], b['boxes'], b['scores']))[:20]:  # the best detections
            # its twin among the .pth's: same label, same score, box within 1 px (tied scores may swap places)
            twin = [(np.abs(boxes_a[j] - box).max(), j) for j in range(len(scores_a))
                    if a['labels'][j] == label and abs(scores_a[j] - score) <= 1e-4]
            assert twin and min(twin)[0] <= 1.0, (label, box, score)
    # the CLI's predict with --weights FILE.onnx writes the same COCO results (original category ids)
    import json
    out_t, out_o = tmp_path / 'pt', tmp_path / 'ox'
    assert main(['predict', '--checkpoint', str(ckpt), files[0], '--out', str(out_t)]) == 0
    assert main(['predict', '--weights', str(tmp_path / 'm.onnx'), files[0], '--out', str(out_o)]) == 0
    rt, ro = (json.loads((d / 'predictions.json').read_text()) for d in (out_t, out_o))
    assert {r['category_id'] for r in ro} <= {1, 3, 5, 7} and len(rt) == len(ro)


def test_onnx_file_errors(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node('Identity', ['images'], ['output'])], 'g',
                              [helper.make_tensor_value_info('images', TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info('output', TensorProto.FLOAT, [1, 3, 32, 32])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)]), tmp_path / 'other.onnx')
    with pytest.raises(DetlearnError, match='not written by `detlearn export`'):
        pipeline('image-object-detection', model=tmp_path / 'other.onnx', device='cpu')
