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
