"""The book's order is its dependency order: no module imports a later chapter's, no circles, families apart.

    python tools/check_layout.py   # exit 1 (and a list) on a forward import, a circle or one family importing another

Chapter order is `sorted(glob('nbs/**/*.ipynb', recursive=True))`, the order nbdev and a reader see them in; each
chapter's module is its `#| default_exp`. Every `from detlearn... import` counts, at module level and inside
functions (a deferred import is still a dependency); `import detlearn` alone (the package's own folder) does not.
"""
import ast
import glob
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def chapters(root: Path = ROOT) -> dict:
    """module (dotted, without 'detlearn.') -> (chapter index, notebook path)."""
    found = {}
    for i, nb in enumerate(sorted(glob.glob(str(root / 'nbs' / '**' / '*.ipynb'), recursive=True))):
        for cell in json.load(open(nb))['cells']:
            if cell['cell_type'] != 'code':
                continue
            m = re.search(r'#\s*\|\s*default_exp\s+(\S+)', ''.join(cell['source']))
            if m:
                found[m.group(1).removesuffix('.__init__')] = (i, str(Path(nb).relative_to(root)))
                break
    return found


def imports(root: Path = ROOT) -> dict:
    """module -> set of detlearn modules it imports (anywhere in the file), as far as chapters know them."""
    known = chapters(root)
    edges = {}
    for f in sorted(glob.glob(str(root / 'detlearn' / '**' / '*.py'), recursive=True)):
        rel = Path(f).relative_to(root / 'detlearn').with_suffix('')
        me = '.'.join(rel.parts).removesuffix('.__init__').removesuffix('__init__')
        if me not in known:
            continue
        pkg = me.split('.') if rel.name == '__init__' else me.split('.')[:-1]
        targets = set()
        for node in ast.walk(ast.parse(Path(f).read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                    tgt = '.'.join(base + ([node.module] if node.module else []))
                elif node.module and node.module.startswith('detlearn.'):
                    tgt = node.module[len('detlearn.'):]
                else:
                    continue
                subs = [f'{tgt}.{a.name}' for a in node.names if f'{tgt}.{a.name}' in known]  # `from pkg import mod`
                targets.update(subs)
                if len(subs) < len(node.names) and tgt in known:  # names defined in the module `tgt` itself
                    targets.add(tgt)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith('detlearn.') and a.name[len('detlearn.'):] in known:
                        targets.add(a.name[len('detlearn.'):])
        edges[me] = targets - {me}
    return edges


def forward_imports(root: Path = ROOT) -> list[str]:
    """'chapter -> later chapter' for every module importing one defined later in the book."""
    known, found = chapters(root), set()
    for me, targets in imports(root).items():
        for t in targets:
            if known[t][0] > known[me][0]:
                found.add(f'{known[me][1]} -> {known[t][1]}')
    return sorted(found)


FAMILIES = ('yolox', 'dino', 'dfine')  # detector families: models.<name>* modules (and folders)


def family_of_module(module: str) -> str | None:
    """The detector family a module belongs to ('models.dfine.loss' -> 'dfine'), None for shared modules."""
    parts = module.split('.')
    if len(parts) < 2 or parts[0] != 'models':
        return None
    return next((f for f in FAMILIES if parts[1] == f or parts[1].startswith(f + '_')), None)


def cross_family_imports(root: Path = ROOT) -> list[str]:
    """'module -> module' where one detector family imports another (shared parts belong outside both)."""
    found = []
    for me, targets in imports(root).items():
        for t in sorted(targets):
            a, b = family_of_module(me), family_of_module(t)
            if a and b and a != b:
                found.append(f'{me} -> {t}')
    return sorted(found)


def circles(root: Path = ROOT) -> list[list[str]]:
    """Groups of modules that import each other (strongly connected components of more than one module)."""
    edges = imports(root)
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def main() -> int:
    fwd, circ, cross = forward_imports(), circles(), cross_family_imports()
    for line in fwd:
        print(f'FORWARD {line}')
    for line in cross:
        print(f'FAMILY {line}')
    for group in circ:
        print(f'CIRCLE {" <-> ".join(group)}')
    print(f'check_layout: {len(fwd)} forward imports, {len(circ)} circles, {len(cross)} imports across families')
    return 1 if fwd or circ or cross else 0


if __name__ == '__main__':
    sys.exit(main())
