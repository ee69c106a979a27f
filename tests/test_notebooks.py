"""Run every notebook in nbs/ through nbdev's own test engine, one pytest test per notebook.

Cells flagged `#| cuda` or `#| slow` are skipped unless named in DETLEARN_NB_FLAGS
(for example `DETLEARN_NB_FLAGS="cuda slow"` on a GPU machine).
"""
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import nbdev.test as nbt  # the module, not `from nbdev.test import test_nb`, which pytest would collect

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / 'nbs').glob('**/*.ipynb') if '.ipynb_checkpoints' not in p.parts)  # book order
FORCED = set(os.environ.get('DETLEARN_NB_FLAGS', '').split())
# chapters whose checks depend on the CPU's precision path or compare with stored float references
CPU_PATH = {'00b_testing.ipynb', '43c_models_dfine_family.ipynb', '50_train_utils.ipynb', '57_bench.ipynb',
            '55_export.ipynb'}


@pytest.fixture
def private_tmp():
    """Every temporary file a chapter makes (tempfile.mkdtemp, checkpoints of its demo runs) goes into one folder
    that is removed after the chapter, pass or fail: the chapters write gigabytes of checkpoints in all, and a
    suite run must not fill the disk of the machine it runs on."""
    old_env, old_dir = os.environ.get('TMPDIR'), tempfile.tempdir
    folder = tempfile.mkdtemp(prefix='detlearn-nb-')
    os.environ['TMPDIR'], tempfile.tempdir = folder, folder
    try:
        yield Path(folder)
    finally:
        tempfile.tempdir = old_dir
        if old_env is None:
            os.environ.pop('TMPDIR', None)
        else:
            os.environ['TMPDIR'] = old_env
        shutil.rmtree(folder, ignore_errors=True)


def test_private_tmp_holds_mkdtemp(private_tmp):
    assert Path(tempfile.mkdtemp()).parent == private_tmp  # mkdtemp inside a chapter lands in the private folder


@pytest.mark.parametrize('notebook', [pytest.param(p, marks=[pytest.mark.cpu_path] if p.name in CPU_PATH else [])
                                      for p in NOTEBOOKS], ids=lambda p: p.name)
def test_notebook(notebook, private_tmp):
    skip = [flag for flag in ('cuda', 'slow') if flag not in FORCED]
    ok, seconds = nbt.test_nb(notebook, skip_flags=skip, basepath=ROOT)
    assert ok, f'{notebook.name} failed after {seconds:.1f}s (its traceback is in the captured stderr)'


def test_notebooks_found():
    assert len(NOTEBOOKS) >= 2, 'nbs/ should hold the chapters'
    assert CPU_PATH <= {p.name for p in NOTEBOOKS}, CPU_PATH - {p.name for p in NOTEBOOKS}
