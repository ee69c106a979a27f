"""Fixtures shared by several test files."""
import atexit
import os
import shutil
import tempfile

import pytest


def missing(what: str):
    """Skip for a missing optional tool, but fail in CI (where everything must be installed)."""
    if os.environ.get('CI'):
        pytest.fail(f'{what} -- required because CI is set')
    pytest.skip(what)


@pytest.fixture(scope='module')
def fo():
    """The fiftyone package, on a private database directory, without telemetry or progress bars."""
    if 'FIFTYONE_DATABASE_DIR' not in os.environ:
        # ~300 MB of MongoDB files per test process: removed at exit (registered before fiftyone is imported, so
        # it runs after fiftyone's own exit handler has stopped the database)
        folder = tempfile.mkdtemp(prefix='detlearn-fo-')
        os.environ['FIFTYONE_DATABASE_DIR'] = folder
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ['FIFTYONE_DO_NOT_TRACK'] = 'true'
    try:
        import fiftyone
    except ImportError:
        missing('fiftyone is not installed: pip install -e ".[viz]"')
    fiftyone.config.show_progress_bars = False
    return fiftyone


def pytest_configure(config):
    """DETLEARN_DETERMINISTIC=1: the whole suite under torch.use_deterministic_algorithms(True), as users who
    ask PyTorch for reproducibility run it (every op detlearn uses must then have a deterministic kernel)."""
    config.addinivalue_line('markers', 'cpu_path: compares floats with stored references or depends on the CPU '
                                       'precision path; tools/test.sh runs these again on the other CPU path')
    if os.environ.get('DETLEARN_DETERMINISTIC') == '1':
        import torch
        torch.use_deterministic_algorithms(True)
