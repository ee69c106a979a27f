"""The book renders: nbdev's docs processing (what `nbdev_docs` runs before Quarto) passes for every notebook.

`tools/proc_docs.py` runs nbdev's notebook processors on each notebook. They execute every exported cell and every
cell with an import in it, without the other cells; a cell that mixes imports with other code fails there (it
would use names the skipped cells define), so imports live in cells of their own.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / 'tools' / 'proc_docs.py'


def _run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)


def _notebook(path: Path, *cells: str) -> Path:
    nb = {'cells': [{'cell_type': 'code', 'execution_count': None, 'id': f'c{i}', 'metadata': {}, 'outputs': [],
                     'source': src} for i, src in enumerate(cells)],
          'metadata': {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}},
          'nbformat': 4, 'nbformat_minor': 5}
    path.write_text(json.dumps(nb))
    return path


def test_every_notebook_processes(tmp_path):
    result = _run('--out', tmp_path, '--workers', '2')
    assert result.returncode == 0, result.stdout + result.stderr
    notebooks = sorted(p.name for p in (ROOT / 'nbs').glob('**/*.ipynb'))
    assert sorted(p.name for p in tmp_path.glob('*.ipynb')) == notebooks
    assert f'{len(notebooks)}/{len(notebooks)} notebooks processed' in result.stdout
    # the API docs were rendered: show_doc's output for an exported function is in the processed chapter
    boxes = (tmp_path / '01_boxes.ipynb').read_text()
    assert 'box_iou' in boxes and 'text/markdown' in boxes


def test_mixed_import_cell_fails(tmp_path):
    """The check can fail: a cell that mixes an import with code using an earlier cell's name is reported."""
    bad = _notebook(tmp_path / 'bad.ipynb', '#| default_exp scratch_bad',
                    '#| export\ndef area(w, h):\n    "Width times height."\n    return w * h',
                    'sizes = [(2, 3), (4, 5)]',
                    'import math\nprint(math.prod(sizes[0]))')
    result = _run('--out', tmp_path / 'out', bad)
    assert result.returncode == 1, result.stdout
    assert 'FAIL bad.ipynb' in result.stdout and 'mixes imports' in result.stdout
    assert "name 'sizes' is not defined" in result.stdout, result.stdout
    harmless = _notebook(tmp_path / 'harmless.ipynb', '#| default_exp scratch_harmless',
                         '#| export\ndef area(w, h):\n    "Width times height."\n    return w * h',
                         'import math\nside = math.sqrt(area(2, 8))')  # runs, but is still mixed
    result = _run('--out', tmp_path / 'out', harmless)
    assert result.returncode == 1 and 'FAIL harmless.ipynb: a cell mixes imports' in result.stdout, result.stdout


def test_split_cells_process(tmp_path):
    """The same notebook with its import in a cell of its own processes."""
    good = _notebook(tmp_path / 'good.ipynb', '#| default_exp scratch_good',
                     '#| export\ndef area(w, h):\n    "Width times height."\n    return w * h',
                     'sizes = [(2, 3), (4, 5)]', 'import math', 'print(math.prod(sizes[0]))')
    result = _run('--out', tmp_path / 'out', good)
    assert result.returncode == 0, result.stdout + result.stderr
    assert '1/1 notebooks processed' in result.stdout
