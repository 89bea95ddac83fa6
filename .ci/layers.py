"""The shape of the house, checked (issue #24; the page that shows it: nbs/how_craft_is_built.ipynb).

1. Layers: a notebook's module imports only from modules whose notebooks sort before its own
   (`00_errors` < `03_model` < `03a_machine` < `04_training` ...), lazy imports inside functions included.
2. No module imports a private name (`_x`) from another.
3. No module is over 800 lines.
4. Each run-directory file name is written in one module only (the run-directory module).

Usage: python .ci/layers.py            (exit 1 and one line per breach; the layer table with -v)
"""
import ast, json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 800
RUN_FILES = ('best.safetensors', 'latest.safetensors', 'status.json', 'metrics.jsonl', 'config.json',
             'tokenizer.json', 'state.pt', 'provenance.json', 'adapters.safetensors', 'base.safetensors')

def notebook_modules():
    "Each exported module's notebook, in the order of the notebooks' names: {module: (rank, notebook, summary)}."
    found = {}
    for rank, nb in enumerate(sorted((ROOT/'nbs').glob('*.ipynb'))):
        sources = [''.join(c['source']) for c in json.loads(nb.read_text())['cells']]
        summary = next((m.group(1) for s in sources[:2] if (m := re.search(r'^> (.+)$', s, re.M))), '')
        for source in sources:
            m = re.search(r'^#\|\s*default_exp\s+(\S+)', source, re.M)
            if m: found[m.group(1)] = (rank, nb.name, summary); break
    return found

def craft_imports(path):
    "(line, module, names) of every import of a craft module in the file at `path`."
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level == 1: name = mod
            elif mod.startswith('craft.'): name = mod[len('craft.'):]
            elif mod == 'craft': name = None
            else: continue
            for alias in node.names:
                yield node.lineno, (name or alias.name).split('.')[0], alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith('craft.'): yield node.lineno, alias.name.split('.')[1], None

def layer_rows():
    "One row per module, in layer order: its notebook, what it owns (the notebook's summary), lines and the modules it uses."
    rows = []
    for mod, (rank, nb, summary) in sorted(notebook_modules().items(), key=lambda kv: kv[1]):
        path = ROOT/'craft'/f'{mod}.py'
        if not path.exists(): continue
        imports = list(craft_imports(path))
        rows.append(dict(notebook=nb.removesuffix('.ipynb'), module=mod, owns=summary, lines=len(path.read_text().splitlines()),
                         uses=sorted({used for _, used, _ in imports} - {mod}), imports=imports))
    return rows

def breaches(verbose=False):
    "Every way the package breaks the shape of the house, one line each."
    mods, out = notebook_modules(), []
    for row in layer_rows():
        mod, nb, lines = row['module'], row['notebook'], row['lines']
        if lines > MAX_LINES: out.append(f'craft/{mod}.py has {lines} lines (at most {MAX_LINES}): split it by concern')
        for line, used, name in row['imports']:
            if used in mods and mods[used][0] > mods[mod][0]:
                out.append(f'craft/{mod}.py:{line} ({nb}) imports {used} from a later notebook ({mods[used][1]})')
            if name and name.startswith('_') and used != mod:
                out.append(f'craft/{mod}.py:{line} imports the private name {name} from {used}: make it public or move it')
        if verbose: print(f'{nb:28} craft.{mod:12} {lines:5} lines  uses {", ".join(row["uses"]) or "-"}')
    for fname in RUN_FILES:
        owners = sorted(p.stem for p in (ROOT/'craft').glob('*.py') if p.name != '_modidx.py' and fname in p.read_text())
        if len(owners) > 1: out.append(f"the run-directory file name '{fname}' is written in {len(owners)} modules: {', '.join(owners)}")
    return out

if __name__ == '__main__':
    found = breaches(verbose='-v' in sys.argv)
    for line in found: print(line)
    print(f'layers: {len(found)} breach(es)' if found else 'layers: every module imports only from earlier notebooks; none is over 800 lines')
    sys.exit(1 if found else 0)
