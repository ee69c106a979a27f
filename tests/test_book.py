"""The book reads cleanly: `tools/check_notebooks.py` finds nothing outside its allow-list, and it can fail."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import check_notebooks  # noqa: E402  (a script in tools/, not a package)


def test_book_is_clean():
    result = subprocess.run([sys.executable, str(ROOT / 'tools' / 'check_notebooks.py')],
                            capture_output=True, text=True, cwd=ROOT)
    failures = [line for line in result.stdout.splitlines() if line.startswith('FAIL')]
    assert result.returncode == 0, 'tools/check_notebooks.py found:\n' + '\n'.join(failures)


def test_output_check_catches_each_problem():
    stderr = {'output_type': 'stream', 'name': 'stderr', 'text': 'x'}
    warning = {'output_type': 'stream', 'name': 'stdout', 'text': 'a.py:3: UserWarning: careful\n'}
    error = {'output_type': 'error', 'ename': 'ValueError', 'evalue': 'bad', 'traceback': ['ValueError: bad']}
    path = {'output_type': 'stream', 'name': 'stdout', 'text': ['saved to /tmp/abc/model.pt\n']}
    bar = {'output_type': 'stream', 'name': 'stdout', 'text': ' 40%|████      | 4/10 [00:01<00:02, 3.1it/s]'}
    image = {'output_type': 'display_data', 'data': {'image/png': 'A' * 400 * 1024}}
    for output in (stderr, warning, error, path, bar, image):
        assert check_notebooks.check_output(output), output
    fine = {'output_type': 'execute_result', 'data': {'text/plain': ['tensor([1., 2.])'], 'image/png': 'A' * 1000}}
    assert check_notebooks.check_output(fine) == []


def test_module_check_uses_tokens(tmp_path):
    module = tmp_path / 'm.py'
    module.write_text("x = 'a; b'  # c; d\ny = 1; z = 2\n" + 'w = ' + '1 + ' * 40 + '1\n')
    findings = check_notebooks.check_module(module)
    assert findings == ['line 3: 165 characters (> 120)', 'line 2: `;` joins statements']


def test_allowlist_exempts_and_reports_stale(tmp_path):
    (tmp_path / 'nbs').mkdir()
    (tmp_path / 'tools').mkdir()
    (tmp_path / 'detlearn').mkdir()
    cell = {'cell_type': 'code', 'source': 'print(1)', 'metadata': {},
            'outputs': [{'output_type': 'stream', 'name': 'stderr', 'text': 'oops'}]}
    (tmp_path / 'nbs' / 'a.ipynb').write_text(json.dumps({'cells': [cell]}))
    assert check_notebooks.main(['--root', str(tmp_path)]) == 1
    (tmp_path / 'tools' / 'book_allowlist.txt').write_text('nbs/a.ipynb  # being fixed\nnbs/gone.ipynb\n')
    assert check_notebooks.main(['--root', str(tmp_path)]) == 0
    assert check_notebooks.main(['--root', str(tmp_path), '--no-allowlist']) == 1


def test_book_order_is_dependency_order():
    """No module imports a later chapter's (module level or in a function), no circles, no family imports another."""
    import check_layout  # noqa: E402  (a script in tools/)
    forward, circles = check_layout.forward_imports(), check_layout.circles()
    assert not forward, 'imports that point to a later chapter:\n' + '\n'.join(forward)
    assert not circles, 'modules that import each other:\n' + '\n'.join(' <-> '.join(g) for g in circles)
    cross = check_layout.cross_family_imports()
    assert not cross, 'a detector family imports another:\n' + '\n'.join(cross)


def test_layout_check_catches_forward_imports_and_circles(tmp_path):
    import check_layout  # noqa: E402
    (tmp_path / 'nbs').mkdir()
    (tmp_path / 'detlearn').mkdir()
    for i, name in enumerate(['a', 'b']):
        cell = {'cell_type': 'code', 'source': [f'#| default_exp {name}'], 'metadata': {}, 'outputs': []}
        (tmp_path / 'nbs' / f'0{i}_{name}.ipynb').write_text(json.dumps({'cells': [cell]}))
    (tmp_path / 'detlearn' / 'a.py').write_text('def f():\n    from detlearn.b import g\n')
    (tmp_path / 'detlearn' / 'b.py').write_text('from .a import f\n')
    assert layout_findings(check_layout, tmp_path) == (['nbs/00_a.ipynb -> nbs/01_b.ipynb'], [['a', 'b']])
    (tmp_path / 'detlearn' / 'a.py').write_text('x = 1\n')
    assert layout_findings(check_layout, tmp_path) == ([], [])
    assert check_layout.family_of_module('models.dfine.loss') == 'dfine'
    assert check_layout.family_of_module('models.yolox.loss') == 'yolox'
    assert check_layout.family_of_module('models.family') is None


def layout_findings(check_layout, root):
    return check_layout.forward_imports(root), check_layout.circles(root)


def test_widget_state_and_widget_pictures(tmp_path):
    """Stored widget state is reported; so is a widget that a page without a kernel could not show."""
    widget = {'output_type': 'display_data', 'metadata': {},
              'data': {'application/vnd.jupyter.widget-view+json': {'model_id': 'x'}, 'text/plain': 'VBox()'}}
    picture = {'output_type': 'display_data', 'metadata': {}, 'data': {'image/png': 'iVBORw0KGgo='}}

    def code(*outputs):
        return {'cell_type': 'code', 'source': 'w', 'metadata': {}, 'outputs': list(outputs)}
    path = tmp_path / 'a.ipynb'
    path.write_text(json.dumps({'cells': [code(), code(widget)], 'metadata': {}}))
    assert check_notebooks.check_notebook(path) == [
        "cell 1 ('w'): a widget with no picture of it in this cell or the 2 code cells before "
        "(a page without a kernel shows nothing)"]
    path.write_text(json.dumps({'cells': [code(picture), code(), code(widget)],
                                'metadata': {'widgets': {'state': {}}}}))
    assert check_notebooks.check_notebook(path) == [
        'notebook metadata stores widget state: delete its "widgets" entry']
    path.write_text(json.dumps({'cells': [code(), code(dict(widget, data={**widget['data'], **picture['data']}))],
                                'metadata': {}}))
    assert check_notebooks.check_notebook(path) == []
