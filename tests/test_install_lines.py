"""Every `pip install` line the README and the notebooks show works as written: detlearn comes from its git
repository (settings.ini's git_url) or from the wheel `python -m build` writes, with extras that exist; anything
else named is one of detlearn's own (optional) requirements. The tutorials run after a plain install (no dev tools).
The Colab notebook's install cell itself runs in tests/test_packaging.py."""
import configparser, fnmatch, json, re, shlex
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from detlearn.utils import GIT_URL, install_command

ROOT = Path(__file__).resolve().parents[1]
CFG = configparser.ConfigParser(delimiters=['='])
CFG.read(ROOT / 'settings.ini')
SETTINGS = CFG['DEFAULT']
EXTRAS = {k.removesuffix('_requirements') for k in SETTINGS if k.endswith('_requirements') and k != 'requirements'}
KNOWN = {canonicalize_name(Requirement(r).name) for k in SETTINGS if k.endswith('requirements')
         for r in SETTINGS[k].split()}  # every requirement detlearn declares, optional ones included
WHEEL = f"dist/detlearn-{SETTINGS['version']}-py3-none-any.whl"  # what the release step (`python -m build`) writes
# `pip install` and its arguments: double-quoted or bare words, up to a backtick, a quote or the end of the line.
PIP = re.compile(r'pip install((?:[ \t]+(?:"[^"\n]*"|[^\s`\'"\\()]+))+)')


def shown_texts() -> list[tuple[str, str]]:
    """(where, text) of the README and of every notebook cell."""
    texts = [('README.md', (ROOT / 'README.md').read_text())]
    for nb in sorted((ROOT / 'nbs').glob('**/*.ipynb')):
        for i, cell in enumerate(json.loads(nb.read_text())['cells']):
            texts.append((f'{nb.name} cell {i}', ''.join(cell['source'])))
    return texts


def pip_lines() -> list[tuple[str, str]]:
    return [(where, m.group(1).strip()) for where, text in shown_texts() for m in PIP.finditer(text)]


def problems(args: str) -> list[str]:
    """What is wrong with the arguments of one `pip install` line (empty: it installs as written)."""
    words, bad = shlex.split(args), []
    while words:
        w = words.pop(0)
        if w in ('...', '-r', '--requirement', '&&', '||', ';', '|') or w.startswith('#'):
            break  # a placeholder, another project's requirements file, or the next command
        if '{' in w:
            break  # a template in code: install_command's, checked in test_git_url_is_the_projects
        if w in ('--target', '-t', '-c', '--constraint'):
            words = words[1:]
        elif w.startswith('-'):
            continue
        elif w == '.' or w.startswith(('./', '/')):
            continue  # a checkout
        elif w.startswith('dist/'):
            if not fnmatch.fnmatch(WHEEL, w.split('[')[0]):  # the name, or a shell pattern matching it
                bad.append(f'{w}: the release step writes {WHEEL}')
        else:
            req = Requirement(w)
            if canonicalize_name(req.name) == 'detlearn':
                if req.url != f'git+{GIT_URL}':
                    bad.append(f'{w}: detlearn is on no package index; install it from git+{GIT_URL}')
                bad += [f'{w}: no extra {e!r} (there are {sorted(EXTRAS)})' for e in req.extras - EXTRAS]
            elif canonicalize_name(req.name) not in KNOWN:
                bad.append(f'{w}: not one of detlearn\'s requirements')
    return bad


def test_the_checker_tells_good_lines_from_bad():
    assert problems('"detlearn[cuda12,viz] @ git+https://github.com/detlearn/detlearn"') == []
    assert problems(f'-q torch==2.14.1 -e . "{WHEEL}[export]" cupy-cuda13x') == []
    assert problems('detlearn') and problems('"detlearn[cuda]"') and problems('dist/detlearn-0.0.1-py3-none-any.whl')
    assert problems('"detlearn[nope] @ git+https://github.com/detlearn/detlearn"') and problems('tensorflow')


def test_git_url_is_the_projects():
    assert GIT_URL == SETTINGS['git_url']
    for extra in ('', 'export', 'viz'):
        assert problems(install_command(extra).removeprefix('pip install ')) == []
    assert {'export', 'viz', 'cuda12', 'cuda13'} <= EXTRAS


def test_every_pip_line_shown_works_as_written():
    lines = pip_lines()
    assert len(lines) >= 10, lines  # the README, the quick start and the Colab notebook all show some
    assert any('git+' in args for _, args in lines) and any(WHEEL in args for _, args in lines)
    bad = [f'{where}: pip install {args}: {p}' for where, args in lines for p in problems(args.replace('\\', ''))]
    assert not bad, '\n'.join(bad)


@pytest.mark.parametrize('notebook', ['90_quick_start.ipynb', '91_colab_t4.ipynb', '93_from_modelscope.ipynb'])
def test_tutorials_need_no_development_tools(notebook):
    cells = json.loads((ROOT / 'nbs' / '9_tutorials' / notebook).read_text())['cells']
    code = '\n'.join(''.join(c['source']) for c in cells if c['cell_type'] == 'code')
    used = set(re.findall(r'^\s*(?:from|import)\s+(\w+)', code, flags=re.M))
    assert not used & {'fastcore', 'nbdev', 'pytest', 'hypothesis', 'execnb'}, used
