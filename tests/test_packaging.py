"""The release path a user gets: `python -m build` (an sdist, then a wheel built from that sdist), metadata that
`twine check` accepts, and the wheel installed into a fresh virtual environment outside the checkout, where the
`detlearn` command runs the demo from a clean folder.

The fresh environment gets detlearn's dependencies (torch and the rest, several GB) from the environment running
the tests through a `.pth` line, instead of installing them again: detlearn itself comes from the wheel only.
"""
import email.parser, json, os, subprocess, sys, sysconfig, tarfile, zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group('packaging')  # one build, one fresh environment


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    """`cmd` with its output captured; on failure the assertion shows it."""
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert done.returncode == 0, f'{cmd} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}'
    return done


@pytest.fixture(scope='module')
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """(sdist, wheel) from `python -m build`, which builds the wheel from the unpacked sdist."""
    out = tmp_path_factory.mktemp('dist')
    run([sys.executable, '-m', 'build', '--outdir', out, ROOT], cwd=out)
    (sdist,), (whl,) = out.glob('detlearn-*.tar.gz'), out.glob('detlearn-*.whl')
    return sdist, whl


@pytest.fixture(scope='module')
def wheel(dists) -> Path: return dists[1]


def _repo_files(folder: str) -> set[str]:
    return {p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).rglob('*') if p.is_file()}


def test_sdist_holds_what_setup_reads(dists):
    names = {n.split('/', 1)[1] for n in tarfile.open(dists[0]).getnames() if '/' in n}
    for f in ('settings.ini', 'setup.py', 'pyproject.toml', 'README.md', 'LICENSE', 'detlearn/__init__.py'):
        assert f in names, f'{f} missing from the sdist'
    for folder in ('cupy_kernels', 'data_samples'):
        missing = {f'{folder}/{p}' for p in _repo_files(folder)} - names
        assert not missing, f'{folder} files missing from the sdist: {sorted(missing)[:5]}'


def test_wheel_holds_kernels_and_samples(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for folder in ('cupy_kernels', 'data_samples'):
        expected = {f'detlearn/{folder}/{p}' for p in _repo_files(folder)}
        assert expected and expected <= set(names), f'{folder} files missing from the wheel: {sorted(expected - set(names))[:5]}'
    assert any(n.endswith('.dist-info/licenses/LICENSE') for n in names), 'LICENSE missing from the wheel'


def test_metadata(dists):
    run([sys.executable, '-m', 'twine', 'check', '--strict', *dists])
    with zipfile.ZipFile(dists[1]) as z:
        (name,) = [n for n in z.namelist() if n.endswith('.dist-info/METADATA')]
        meta = email.parser.Parser().parsestr(z.read(name).decode())
    assert 'Apache-2.0' in (meta['License-Expression'] or meta['License'])
    assert meta['License-File'] == 'LICENSE'
    assert {'dev', 'viz', 'export', 'cuda12', 'cuda13'} <= set(meta.get_all('Provides-Extra'))
    requires = meta.get_all('Requires-Dist')
    assert 'cupy-cuda12x; extra == "cuda12"' in requires and 'cupy-cuda13x; extra == "cuda13"' in requires
    assert any(r.startswith('onnxruntime') and 'extra == "export"' in r for r in requires)
    urls = dict(u.split(', ', 1) for u in meta.get_all('Project-URL'))
    assert urls['Source'] == 'https://github.com/detlearn/detlearn' and 'Issues' in urls
    classifiers = meta.get_all('Classifier')
    assert 'Development Status :: 3 - Alpha' in classifiers and 'Programming Language :: Python :: 3.11' in classifiers
    assert meta['Requires-Python'] == '>=3.10' and meta['Description-Content-Type'] == 'text/markdown'


def fresh_venv(where: Path) -> Path:
    """A new virtual environment at `where` whose site-packages also sees this environment's (for torch & co)."""
    run([sys.executable, '-m', 'venv', where])
    site = Path(run([where / 'bin' / 'python', '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])']
                    ).stdout.strip())
    # A path line in a .pth file is appended to sys.path (after the venv's own site-packages, so the wheel wins);
    # the .pth files inside it (this checkout's editable install) are not processed.
    (site / 'deps_from_test_env.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    return where / 'bin'


@pytest.fixture(scope='module')
def installed(wheel, tmp_path_factory) -> Path:
    """bin/ of a fresh venv outside the checkout with the wheel installed (its dependencies already there)."""
    bin_ = fresh_venv(tmp_path_factory.mktemp('venv') / 'env')
    run([bin_ / 'python', '-m', 'pip', 'install', '-q', '--no-deps', wheel])
    check = subprocess.run([bin_ / 'python', '-m', 'pip', 'check'], capture_output=True, text=True).stdout
    assert not [l for l in check.splitlines() if l.startswith('detlearn ')], check  # its requirements are met
    return bin_


def test_installed_package_finds_its_resources(installed, tmp_path):
    code = ("import detlearn, detlearn.utils as u, json; print(json.dumps([detlearn.__file__, "
            "str(u.resource_dir('cupy_kernels')), str(u.resource_dir('data_samples'))]))")
    out = run([installed / 'python', '-c', code], cwd=tmp_path)
    prefix = installed.parent
    for found in json.loads(out.stdout):
        assert Path(found).is_relative_to(prefix), f'{found} is not inside the fresh environment {prefix}'


def test_installed_command_and_module_answer(installed, tmp_path):
    version = run([installed / 'python', '-c', 'import detlearn; print(detlearn.__version__)'], cwd=tmp_path).stdout
    for cmd in ([installed / 'detlearn', '--version'], [installed / 'python', '-m', 'detlearn', '--version']):
        assert run(cmd, cwd=tmp_path).stdout == f'detlearn {version}'
    code = "import detlearn; print(detlearn.__doc__ is not None, sorted(detlearn.__all__))"
    assert run([installed / 'python', '-c', code], cwd=tmp_path).stdout.split(None, 1) == [
        'True', "['build_trainer', 'create', 'pipeline']\n"]


def test_installed_demo_runs_from_a_clean_folder(installed, tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    out = run([installed / 'detlearn', 'demo', '--epochs', '1'], cwd=tmp_path, env=env)
    assert 'AP50' in out.stdout, out.stdout
    for f in ('last.pth', 'predictions_val.json', 'metrics.csv'):
        assert (tmp_path / 'detlearn_demo' / f).is_file(), f'the demo wrote no {f}'


def test_wheel_is_the_one_the_readme_names(wheel):
    version = next(l.split('=', 1)[1].strip() for l in (ROOT / 'settings.ini').read_text().splitlines()
                   if l.startswith('version'))
    assert wheel.name == f'detlearn-{version}-py3-none-any.whl'
    assert f'dist/{wheel.name}' in (ROOT / 'README.md').read_text()


def test_colab_install_cell_installs_detlearn(tmp_path):
    """The Colab notebook's install cell, run as on Colab but with this checkout in place of the git URL (the
    same `detlearn[extra] @ URL` requirement; no network here) in a fresh environment outside the checkout."""
    cells = json.loads((ROOT / 'nbs' / '9_tutorials' / '91_colab_t4.ipynb').read_text())['cells']
    (cell,) = [''.join(c['source']) for c in cells if "IN_COLAB = 'google.colab' in sys.modules" in ''.join(c['source'])]
    url = 'git+https://github.com/detlearn/detlearn'
    assert f'@ {url}' in cell
    script = tmp_path / 'install_cell.py'
    script.write_text("import sys, types\nsys.modules['google.colab'] = types.ModuleType('google.colab')  # as on Colab\n"
                      + cell.replace(url, ROOT.as_uri()))
    bin_ = fresh_venv(tmp_path / 'env')
    run([bin_ / 'python', script], cwd=tmp_path, env={**os.environ, 'PIP_DISABLE_PIP_VERSION_CHECK': '1'})
    out = run([bin_ / 'python', '-c', 'import detlearn, cupy; print(detlearn.__file__)'], cwd=tmp_path)
    assert Path(out.stdout.strip()).is_relative_to(tmp_path / 'env'), out.stdout


def test_smoke_tests_pass_in_the_fresh_environment(installed, tmp_path):
    """tests/smoke_installed.py, copied outside the checkout and run by the fresh environment's pytest."""
    (tmp_path / 'test_smoke.py').write_text((ROOT / 'tests' / 'smoke_installed.py').read_text())
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    out = run([installed / 'python', '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-p', 'no:xdist', 'test_smoke.py'],
              cwd=tmp_path, env=env)
    assert '3 passed' in out.stdout, out.stdout[-2000:]
