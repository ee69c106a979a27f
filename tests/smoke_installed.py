"""Smoke tests of an installed detlearn, run by tests/test_packaging.py with the fresh environment's Python in a
folder outside the checkout (so nothing here can come from the source tree). Not collected in the checkout: the
file name does not start with `test_`."""
import json
import subprocess
import sys
from pathlib import Path

import torch


def test_the_package_is_the_installed_one():
    import detlearn
    assert 'site-packages' in Path(detlearn.__file__).parts, detlearn.__file__


def test_a_model_detects_on_a_bundled_image():
    from PIL import Image
    from detlearn import create, pipeline
    from detlearn.utils import resource_dir
    shapes = resource_dir('data_samples') / 'shapes'
    first = json.loads((shapes / 'val.json').read_text())['images'][0]
    model = create('yolox_nano', num_classes=4)
    detect = pipeline('image-object-detection', model=model, device='cpu')
    out = detect(Image.open(shapes / 'val' / first['file_name']).convert('RGB'))
    assert {'boxes', 'scores', 'labels'} <= set(out)  # a random model finds whatever it finds: the call must work
    with torch.no_grad():
        y = model.eval()(torch.zeros(1, 3, 64, 64))
    assert all(torch.isfinite(v).all() for v in y.values() if isinstance(v, torch.Tensor))


def test_the_command_checks_the_bundled_sample():
    from detlearn.utils import resource_dir
    shapes = resource_dir('data_samples') / 'shapes'
    r = subprocess.run([sys.executable, '-m', 'detlearn', 'data', 'check', str(shapes / 'val.json'),
                        '--images', str(shapes / 'val')], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
