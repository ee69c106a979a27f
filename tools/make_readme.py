"""Write README.md from nbs/index.ipynb (Quarto, which `nbdev_readme` needs, cannot be installed here).

    python tools/make_readme.py          # rewrite README.md
    python tools/make_readme.py --check  # exit 1 if README.md is out of date
"""
import re, sys
from pathlib import Path
import nbformat
from nbconvert import MarkdownExporter

ROOT = Path(__file__).resolve().parents[1]
DIRECTIVE = re.compile(r'^\s*#\|.*$')

def render() -> str:
    nb = nbformat.read(ROOT / 'nbs' / 'index.ipynb', as_version=4)
    cells = []
    for cell in nb.cells:
        lines = cell.source.split('\n')
        if any(re.match(r'^\s*#\|\s*hide\b', l) for l in lines): continue
        cell.source = '\n'.join(l for l in lines if not DIRECTIVE.match(l)).strip('\n')
        cells.append(cell)
    nb.cells = cells
    body, _ = MarkdownExporter().from_notebook_node(nb)
    body = re.sub(r'\n{3,}', '\n\n', body).strip() + '\n'
    return '<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook. -->\n\n' + body

if __name__ == '__main__':
    text, readme = render(), ROOT / 'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit('README.md is out of date with nbs/index.ipynb: run `python tools/make_readme.py`.')
        print('README.md matches nbs/index.ipynb')
    else:
        readme.write_text(text); print('wrote', readme)
