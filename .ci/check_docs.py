"""Check the pages that `.ci/docs.py` processed into `_proc/`, as a reader of the docs site would meet them:
every API entry appears once, no signature says `__main__.`, and the results pages show their results."""
import collections, json, re, sys
from pathlib import Path

RESULTS = {'06_benchmarks.ipynb': ('image/png', 'table'),   # pages that must show a plot and a table of results
           '11_suite.ipynb': ('image/png', 'table')}
ENTRY = re.compile(r'^#{3,4} (\S+)', re.M)                  # the heading show_doc gives an API entry


def outputs(nb:dict):
    "Every output dict of every code cell."
    for cell in nb['cells']:
        yield from cell.get('outputs', [])


def text_of(output:dict) -> str:
    "The text an output shows: its markdown, plain text or stream text."
    data = output.get('data', {})
    return ''.join(data.get('text/markdown', '') or data.get('text/plain', '') or output.get('text', ''))


def has_table(nb:dict) -> bool:
    "Whether an output holds a table: Markdown or HTML, or aligned text with a header rule."
    for o in outputs(nb):
        data, text = o.get('data', {}), text_of(o)
        if '<table' in ''.join(data.get('text/html', '')) or '<table' in text: return True   # HTML, or HTML in markdown (craft.docs)
        if re.search(r'^\|.*\|\s*\n\|[-:| ]+\|', text, re.M): return True
        if re.search(r'^.*\S {2,}\S.*\n(.*\S {2,}\S.*\n){2,}', text, re.M): return True
    return False


def problems(page:Path) -> list[str]:
    nb, found = json.loads(page.read_text(encoding='utf-8')), []
    entries = [m.group(1) for o in outputs(nb) for m in ENTRY.finditer(''.join(o.get('data', {}).get('text/markdown', '')))]
    for name, n in collections.Counter(entries).items():
        if n > 1: found.append(f"API entry {name} appears {n} times")
    if any('__main__.' in json.dumps(o) for o in outputs(nb)): found.append("a signature or output says __main__.")
    for need in RESULTS.get(page.name, ()):
        if need == 'image/png' and not any('image/png' in o.get('data', {}) for o in outputs(nb)): found.append("no plot (image/png output)")
        if need == 'table' and not has_table(nb): found.append("no results table in the outputs")
    return found


def main(proc=Path('_proc')):
    report = {p.name: problems(p) for p in sorted(proc.glob('*.ipynb'))}
    if not report: sys.exit(f"docs check: no processed pages in {proc}; run python .ci/docs.py first")
    quarto = Path('_quarto.yml')
    if quarto.is_file() and (proc / '_quarto.yml').read_text() != quarto.read_text():
        report['_quarto.yml'] = ["the processed _quarto.yml is not the top-level _quarto.yml"]
    bad = {page: found for page, found in report.items() if found}
    for page, found in bad.items(): print(f"{page}: " + '; '.join(found))
    if bad: sys.exit(f"docs check: {len(bad)} page(s) with problems")
    print(f"docs check: {len(report)} pages, each API entry once, no __main__, results shown on {', '.join(RESULTS)}")


if __name__ == '__main__': main()
