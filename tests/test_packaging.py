"""A non-editable install carries the CUDA sources and the sample data inside the package."""
import os, subprocess, sys, zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp('wheel')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
                    '-w', str(out), str(ROOT)], check=True, cwd=out)
    (whl,) = out.glob('detlearn-*.whl')
    return whl


def test_wheel_holds_kernels_and_samples(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for folder in ('cupy_kernels', 'data_samples'):
        expected = {f'detlearn/{folder}/{p.relative_to(ROOT / folder).as_posix()}'
                    for p in (ROOT / folder).rglob('*') if p.is_file()}
        assert expected and expected <= set(names), f'{folder} files missing from the wheel: {sorted(expected - set(names))[:5]}'


def test_installed_package_finds_its_resources(wheel, tmp_path):
    target = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(target), str(wheel)], check=True)
    code = ("import detlearn.utils as u, json; "
            "print(json.dumps([str(u.resource_dir('cupy_kernels')), str(u.resource_dir('data_samples'))]))")
    env = {**os.environ, 'PYTHONPATH': str(target)}
    out = subprocess.run([sys.executable, '-c', code], env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    for found in __import__('json').loads(out.stdout):
        assert Path(found).is_relative_to(target), f'{found} is not inside the installed package at {target}'
