"""No docstring of the installed package and no markdown cell of a notebook holds a control character (a docstring
that is not a raw string turns `\\frac` into a form feed and `\\alpha` into a bell: the docs page shows '␌rac')."""
import ast, json, unicodedata
from pathlib import Path

import craft

ALLOWED = set('\n\t')
NBS = Path(__file__).resolve().parent.parent / 'nbs'


def control_chars(text:str) -> list[str]:
    "The control characters in `text` other than newline and tab, as their code points."
    return [f'U+{ord(c):04X}' for c in text if unicodedata.category(c) == 'Cc' and c not in ALLOWED]


def docstrings(source:str):
    "(name, docstring) of the module, each class and each function in `source`."
    tree = ast.parse(source)
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and (doc := ast.get_docstring(node, clean=False)):
            yield getattr(node, 'name', '<module>'), doc


def test_the_check_catches_a_docstring_that_is_not_raw():
    found = dict(docstrings('def merged():\n    "A plain layer with weight $W + \\\\frac{\\\\alpha}{r}BA$"\n'.replace('\\\\', '\\')))
    assert control_chars(found['merged']) == ['U+000C', 'U+0007']
    assert control_chars('line\n\tindented') == []


def test_no_control_characters_in_docstrings():
    files = sorted(Path(craft.__file__).parent.glob('*.py'))
    assert len(files) > 10
    bad = [f'{f.name}: {name}: {chars}' for f in files for name, doc in docstrings(f.read_text(encoding='utf-8')) if (chars := control_chars(doc))]
    assert bad == [], bad


def test_no_control_characters_in_markdown_cells():
    notebooks = sorted(NBS.glob('*.ipynb'))
    assert len(notebooks) > 10
    bad = [f'{nb.name}: cell {i}: {chars}' for nb in notebooks for i, cell in enumerate(json.loads(nb.read_text(encoding='utf-8'))['cells'])
           if cell['cell_type'] == 'markdown' and (chars := control_chars(''.join(cell['source'])))]
    assert bad == [], bad
