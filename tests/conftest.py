"""Fixtures shared by several test files."""
import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest


def missing(what: str):
    """Skip for a missing optional tool, but fail in CI (where everything must be installed)."""
    if os.environ.get('CI'):
        pytest.fail(f'{what} -- required because CI is set')
    pytest.skip(what)


@pytest.fixture(scope='module')
def fo():
    """The fiftyone package, on a private database directory, without telemetry or progress bars."""
    os.environ['FIFTYONE_DO_NOT_TRACK'] = 'true'
    try:
        import fiftyone
    except ImportError:
        missing('fiftyone is not installed: pip install -e ".[viz]"')
    fiftyone.config.show_progress_bars = False
    return fiftyone


def private_fiftyone_database():
    """Every FiftyOne the suite starts (tests and chapters) uses a database of this run only: a user's own
    datasets are never touched, and two runs on one machine cannot replace each other's datasets. The folder
    (~300 MB of MongoDB files) is removed at exit; registered before fiftyone is imported, so that it runs after
    fiftyone's own exit handler has stopped the database. Each pytest process (each xdist worker) has its own;
    a FIFTYONE_DATABASE_DIR the user set is kept."""
    owner = os.environ.get('DETLEARN_TEST_FO_OWNER')
    if owner == str(os.getpid()) or ('FIFTYONE_DATABASE_DIR' in os.environ and owner is None):
        return
    # MongoDB may still write into the folder after the exit handler removed it (its shutdown outlives the
    # process), so also sweep the folders of earlier runs whose process is gone
    for stale in Path(tempfile.gettempdir()).glob('detlearn-fo-*'):
        pid = stale.name.split('-')[2]
        if pid.isdigit() and not Path(f'/proc/{pid}').exists():
            shutil.rmtree(stale, ignore_errors=True)
    folder = tempfile.mkdtemp(prefix=f'detlearn-fo-{os.getpid()}-')
    os.environ['FIFTYONE_DATABASE_DIR'], os.environ['DETLEARN_TEST_FO_OWNER'] = folder, str(os.getpid())
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


def pytest_configure(config):
    """Private FiftyOne database (see above).

DETLEARN_DETERMINISTIC=1: the whole suite under torch.use_deterministic_algorithms(True), as users who
    ask PyTorch for reproducibility run it (every op detlearn uses must then have a deterministic kernel)."""
    private_fiftyone_database()
    config.addinivalue_line('markers', 'cpu_path: compares floats with stored references or depends on the CPU '
                                       'precision path; tools/test.sh runs these again on the other CPU path')
    if os.environ.get('DETLEARN_DETERMINISTIC') == '1':
        import torch
        torch.use_deterministic_algorithms(True)
