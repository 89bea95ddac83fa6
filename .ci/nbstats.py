"""The rhythm of the notebooks, measured as issue #16 measures fastcore's and nbdev's: exported cells over 25 lines,
definitions per exported cell, the median exported cell, and library lines over 120 characters.

  python .ci/nbstats.py [--max-long 0.10] [NOTEBOOK...]   (default: every notebook in nbs/; exits 1 over the limit)
"""
import argparse, ast, json, statistics, sys
from pathlib import Path


def exported_cells(nb_path:Path) -> list[str]:
    "The source of each exported code cell, directives removed."
    nb = json.loads(nb_path.read_text(encoding='utf-8'))
    cells = []
    for c in nb['cells']:
        src = ''.join(c['source'])
        lines = src.splitlines()
        if c['cell_type'] == 'code' and any(l.strip() in ('#| export', '#|export') for l in lines):
            cells.append('\n'.join(l for l in lines if not l.startswith('#|')))
    return cells


def definitions(src:str) -> int:
    "Top-level functions and classes a cell defines."
    try: tree = ast.parse(src)
    except SyntaxError: return 0
    return sum(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for n in tree.body)


def stats(paths:list[Path]) -> dict:
    cells = [c for p in paths for c in exported_cells(p)]
    sizes = [len([l for l in c.splitlines() if l.strip()]) for c in cells]
    defining = [definitions(c) for c in cells if definitions(c)]
    return {'cells': len(cells), 'long': sum(s > 25 for s in sizes),
            'defs_per_cell': statistics.mean(defining) if defining else 0.0, 'median_lines': statistics.median(sizes) if sizes else 0}


def long_lines(lib=Path('craft'), limit:int=120) -> int:
    return sum(len(l) > limit for f in lib.glob('*.py') if f.name != '_modidx.py' for l in f.read_text(encoding='utf-8').splitlines())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('notebooks', nargs='*', type=Path)
    ap.add_argument('--max-long', type=float, default=None, help='fail if more than this fraction of exported cells is over 25 lines')
    args = ap.parse_args()
    paths = args.notebooks or sorted(Path('nbs').glob('[0-9]*.ipynb'))
    for p in paths:
        s = stats([p])
        print(f"{p.name:24} {s['cells']:4d} exported cells, {s['long']:3d} over 25 lines, {s['defs_per_cell']:.1f} definitions per cell, median {s['median_lines']} lines")
    s = stats(paths)
    share = s['long'] / s['cells'] if s['cells'] else 0.0
    print(f"{'all':24} {s['cells']:4d} exported cells, {s['long']} over 25 lines ({share:.0%}), {s['defs_per_cell']:.1f} definitions per cell, "
          f"median {s['median_lines']} lines; craft/*.py lines over 120 characters: {long_lines()}")
    if args.max_long is not None and share > args.max_long: sys.exit(f"nbstats: {share:.0%} of exported cells are over 25 lines (limit {args.max_long:.0%})")


if __name__ == '__main__': main()
