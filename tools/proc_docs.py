"""Run nbdev's docs processing on every notebook in `nbs/` and name each notebook that does not process.

    python tools/proc_docs.py [--out DIR] [--workers N] [NOTEBOOK ...]

This is what `nbdev_proc_nbs` (and so `nbdev_docs`) does to each notebook: nbdev's `FilterDefaults` processors,
run as `nbdev.serve_drv` runs them (with `IN_TEST=1`), writing the processed notebooks to `--out` (a temporary
folder by default) instead of `_proc/`. Two differences, both so that one broken notebook cannot hide another:
every notebook is processed even when an earlier one fails, and Quarto is not needed (`nbdev_proc_nbs` first
installs it when it is missing).

The docs processor executes, besides exported cells, every cell with an `import` in it, to render `show_doc`.
A cell that mixes imports with other code is therefore run at docs time without the cells before it; nbdev only
warns about it. Here it is a failure too: keep imports in cells of their own.

Exit status 1 when a notebook fails; one `FAIL <notebook>: <reason>` line per notebook.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIXED = 'Found cells containing imports and other code'


def _too_long(signum, frame):
    raise TimeoutError('processing took too long: a cell that runs at docs time is doing real work')


def process(src: str, dst: str, timeout: int = 120) -> tuple[str, list[str], float]:
    """Process one notebook as `nbdev.serve_drv.main` does; the problems found (empty when none) and seconds."""
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _too_long)
    signal.alarm(timeout)
    os.chdir(ROOT)  # nbdev finds settings.ini from the working directory
    os.environ['IN_TEST'] = '1'
    problems, caught = [], []
    try:
        from execnb.nbio import read_nb, write_nb
        from nbdev.processors import FilterDefaults
        nb = read_nb(src)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            FilterDefaults()(nb)
        write_nb(nb, dst)
    except Exception as e:  # noqa: BLE001  (every failure is reported, with its cause)
        cause = e.__cause__ or e
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        problems.append(f'{message} -> {type(cause).__name__}: {str(cause).strip().splitlines()[-1:] or [""]}'
                        .replace("['", '').replace("']", ''))
    finally:
        signal.alarm(0)
        os.environ.pop('IN_TEST', None)
    for w in caught or []:  # also when the processing stopped: the mixed cell is usually why
        if MIXED in str(w.message):
            cell = str(w.message).split('---\n')[1].strip()
            first = cell.splitlines()[0] if cell else ''
            problems.append(f'a cell mixes imports with other code (it starts `{first[:80]}`)')
    return Path(src).name, problems, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('notebooks', nargs='*', help='notebooks to process (default: every notebook under nbs/)')
    parser.add_argument('--out', help='folder for the processed notebooks (default: a temporary folder)')
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--timeout', type=int, default=120, help='seconds one notebook may take')
    parser.add_argument('--times', action='store_true', help="print each notebook's processing time")
    args = parser.parse_args(argv)
    notebooks = [Path(p).resolve() for p in args.notebooks] or sorted((ROOT / 'nbs').glob('**/*.ipynb'))
    out = Path(args.out or tempfile.mkdtemp(prefix='detlearn-proc-'))
    out.mkdir(parents=True, exist_ok=True)
    failed, start = 0, time.perf_counter()
    # IPython, which the processing starts in each worker, replaces `__main__`: hand the workers this module
    # by its name so that they can still find `process`
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import proc_docs
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context('spawn')) as pool:
        jobs = [pool.submit(proc_docs.process, str(nb), str(out / nb.name), args.timeout) for nb in notebooks]
        for job in jobs:
            name, problems, seconds = job.result()
            if args.times:
                print(f'{seconds:6.1f}s {name}')
            for problem in problems:
                print(f'FAIL {name}: {problem}')
            failed += bool(problems)
    print(f'{len(notebooks) - failed}/{len(notebooks)} notebooks processed in {time.perf_counter() - start:.0f}s'
          f' into {out}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
