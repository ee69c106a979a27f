"""Fixtures shared by several test files."""
import os
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
    os.environ.setdefault('FIFTYONE_DATABASE_DIR', tempfile.mkdtemp(prefix='detlearn-fo-'))
    os.environ['FIFTYONE_DO_NOT_TRACK'] = 'true'
    try:
        import fiftyone
    except ImportError:
        missing('fiftyone is not installed: pip install -e ".[viz]"')
    fiftyone.config.show_progress_bars = False
    return fiftyone
