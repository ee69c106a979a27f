"""Official-weights download: a local HTTP server stands in for GitHub (cache, checksums, limits, errors)."""
import hashlib
import http.server
import io
import threading
import time
import warnings

import numpy as np
import pytest
import torch

from detlearn import hub
from detlearn.models import create
from detlearn.pipeline import pipeline
from detlearn.utils import DetlearnError

PAYLOAD = bytes(range(256)) * 40  # 10 KiB
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Server:
    """Serves `files` (name -> bytes) on 127.0.0.1, records each request path; '/slow' stalls."""
    def __init__(self):
        self.files, self.hits = {'/w.pth': PAYLOAD}, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args): pass

            def do_GET(self):
                outer.hits.append(self.path)
                if self.path.startswith('/slow'): time.sleep(2)  # longer than the client's timeout
                if self.path not in outer.files: return self.send_error(404)
                body = outer.files[self.path]
                self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()
                try: self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError): pass  # the client gave up (size limit, timeout)

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope='module')
def server():
    s = _Server()
    yield s
    s.httpd.shutdown(); s.httpd.server_close()


def test_download_then_cache_without_request(server, tmp_path):
    server.hits.clear()
    with pytest.warns(UserWarning, match='no pinned sha256'):
        path = hub.download_weights(f'{server.url}/w.pth', cache_dir=tmp_path)
    assert path == tmp_path / 'w.pth' and path.read_bytes() == PAYLOAD
    assert (tmp_path / 'w.pth.sha256').read_text().split()[0] == PAYLOAD_SHA  # hashlib on the served bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ['w.pth', 'w.pth.sha256']  # no temporary file left
    assert hub.download_weights(f'{server.url}/w.pth', PAYLOAD_SHA, cache_dir=tmp_path) == path
    assert server.hits == ['/w.pth']  # the second call was served from the cache


def test_pinned_hash_is_checked(server, tmp_path):
    path = hub.download_weights(f'{server.url}/w.pth', PAYLOAD_SHA.upper(), cache_dir=tmp_path)
    assert path.read_bytes() == PAYLOAD
    other = tmp_path / 'other'
    with pytest.raises(DetlearnError, match=f'expected sha256 {"0" * 64}, got {PAYLOAD_SHA}') as e:
        hub.download_weights(f'{server.url}/w.pth', '0' * 64, cache_dir=other)
    assert f'{server.url}/w.pth' in str(e.value)
    assert list(other.iterdir()) == []  # neither the file nor a temporary one


def test_cached_file_pinned_mismatch(server, tmp_path):
    with warnings.catch_warnings(): warnings.simplefilter('ignore'); hub.download_weights(f'{server.url}/w.pth', cache_dir=tmp_path)
    with pytest.raises(DetlearnError, match='pinned is 1111'):
        hub.download_weights(f'{server.url}/w.pth', '1' * 64, cache_dir=tmp_path)


def test_size_limit(server, tmp_path):
    with pytest.raises(DetlearnError, match='max_bytes=100'):
        hub.download_weights(f'{server.url}/w.pth', cache_dir=tmp_path, max_bytes=100)
    assert list(tmp_path.iterdir()) == []


def test_404_and_timeout(server, tmp_path):
    with pytest.raises(hub.DownloadError, match='HTTP 404') as e:
        hub.download_weights(f'{server.url}/nope.pth', cache_dir=tmp_path)
    assert not isinstance(e.value, hub.NetworkError) and 'nope.pth' in str(e.value)
    server.files['/slow.pth'] = PAYLOAD
    t0 = time.perf_counter()
    with pytest.raises(hub.NetworkError, match='could not download .*slow.pth'):
        hub.download_weights(f'{server.url}/slow.pth', cache_dir=tmp_path, timeout=0.5)
    assert time.perf_counter() - t0 < 1.8
    assert list(tmp_path.iterdir()) == []


def test_corrupt_cache(server, tmp_path):
    with warnings.catch_warnings(): warnings.simplefilter('ignore'); path = hub.download_weights(f'{server.url}/w.pth', cache_dir=tmp_path)
    path.write_bytes(PAYLOAD[:-1] + b'\x00')  # one byte changed (the last one was 0xff)
    with pytest.raises(DetlearnError, match=f'are corrupt.*recorded in w.pth.sha256 is {PAYLOAD_SHA}.*delete'):
        hub.download_weights(f'{server.url}/w.pth', cache_dir=tmp_path)
    (tmp_path / 'w.pth.sha256').unlink()  # a file without its record is not trusted either
    with pytest.raises(DetlearnError, match='no w.pth.sha256 record'):
        hub.download_weights(f'{server.url}/w.pth', cache_dir=tmp_path)


def test_env_cache_dir_and_unknown_preset(monkeypatch, tmp_path):
    monkeypatch.setenv('DETLEARN_CACHE', str(tmp_path))
    assert hub.weights_cache_dir() == tmp_path and hub.weights_cache_dir(tmp_path / 'x') == tmp_path / 'x'
    with pytest.raises(DetlearnError, match="unknown model 'yolox_huge'"):
        hub.weights_path_for('yolox_huge')
    for name in ['yolox_nano', 'yolox_tiny', 'yolox_s', 'yolox_m', 'yolox_l', 'yolox_x']:
        assert hub.official_weights_url(name) == \
            f'https://github.com/Megvii-BaseDetection/YOLOX/releases/download/0.1.1rc0/{name}.pth'


def test_pipeline_downloads_official_weights(server, monkeypatch, tmp_path):
    torch.manual_seed(0)
    reference = create('yolox_nano').eval()
    for conv in [*reference.head.obj_preds, *reference.head.cls_preds]: torch.nn.init.zeros_(conv.bias)  # scores ~0.25
    buf = io.BytesIO()
    torch.save({'model': reference.state_dict(), 'start_epoch': 300, 'optimizer': {}}, buf)
    server.files['/yolox_nano.pth'] = buf.getvalue()
    monkeypatch.setenv('DETLEARN_CACHE', str(tmp_path))
    monkeypatch.setitem(hub.official_format('yolox_nano').weights_urls, 'yolox_nano', f'{server.url}/yolox_nano.pth')
    monkeypatch.setitem(hub.OFFICIAL_SHA256, 'yolox_nano', hashlib.sha256(buf.getvalue()).hexdigest())
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    pipe = pipeline('image-object-detection', model='yolox_nano', weights=None, device='auto', score_threshold=0.2,
                    fuse=False)  # unfused, to compare the loaded weights tensor by tensor
    assert (tmp_path / 'yolox_nano.pth.sha256').is_file()
    for (k, a), b in zip(reference.state_dict().items(), pipe.model.state_dict().values()): assert torch.equal(a, b), k
    got = pipe(image)
    want = pipeline('image-object-detection', model=reference, device='cpu', score_threshold=0.2)(image)
    assert len(got['scores']) > 0 and pipe.class_names[0] == 'person'  # an official file: COCO's names
    assert [f'class_{pipe.class_names.index(n)}' for n in got['labels']] == want['labels']  # a bare module: numbered
    np.testing.assert_allclose(got['scores'], want['scores'], rtol=1e-5)
    np.testing.assert_allclose(got['boxes'], want['boxes'], rtol=1e-4, atol=1e-3)


def test_pipeline_offline_message(monkeypatch, tmp_path):
    monkeypatch.setenv('DETLEARN_CACHE', str(tmp_path))
    monkeypatch.setitem(hub.official_format('yolox_nano').weights_urls, 'yolox_nano', 'http://127.0.0.1:9/yolox_nano.pth')
    with pytest.raises(DetlearnError, match='seems offline.*pass weights=PATH'):
        pipeline('image-object-detection', model='yolox_nano')
