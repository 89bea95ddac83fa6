"""The docs site in a real browser: every page of `_docs/` (built by `nbdev_docs`, which needs Quarto) served on
loopback and read in Chromium. These tests run with `pytest --site` once the site is built, as CI does after
`nbdev_docs`; the README's plain `pytest` deselects them (a machine without Quarto has no site to read)."""
import functools, http.server, os, re, threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

try: from playwright.sync_api import expect, sync_playwright
except ImportError: sync_playwright = None

from browser import chromium_executable

pytestmark = pytest.mark.site
DOCS = Path(__file__).resolve().parent.parent / '_docs'
FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run']

# What each chapter must show, by the code of the cells that show it: `figures` (code: at least this many images
# in the outputs of the cells with that code), `tables` (a table in such a cell's outputs), `text` (at least 40
# characters of output: a sample).
EXPECTED = {
    'sampling.html':   dict(figures={'plot_transform(': 6, 'fig = plot_attention(model': 1}, text=['print(generate(']),
    'sample.html':     dict(text=['print(out.getvalue())']),
    'training.html':   dict(figures={'plot_metrics(run_dir)': 1}),
    'benchmarks.html': dict(figures={'fig = plot_results(cpu_results)': 1}, tables=['cpu_results = load_results(']),
    'suite.html':      dict(figures={'cpu_suite, to_run = load_suite(': 1, 'for name, ladder in ladders.items()': 1},
                            tables=['show = lambda table, before=']),
    'speculative.html': dict(figures={'for k in (1, 2, 4, 6, 8)': 1}),
    'how_craft_is_built.html': dict(tables=['rows = layers.layer_rows()']),
    'finetune.html':   dict(figures={"for run in result['runs']": 1}, tables=['def _row(r']),
    'deploy.html':     dict(tables=["deploy_file = bench / 'cpu-deploy.json'"]),
    'index.html':      dict(),
}
# Screenshots (test artefacts): the page's top, or the screen from this element (the maths and plots of temperature,
# the recorded CPU results).
SCREENSHOTS = {'index.html': None, 'sampling.html': '#temperature', 'benchmarks.html': ".cell:has(code:has-text('fig = plot_results(cpu_results)'))"}
RAW_TEX = re.compile(r'\$\$|\\\(|\\\[')


def pages() -> list[str]:
    return sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob('*.html'))


@pytest.fixture(scope='module')
def site():
    "`_docs/` on a free port of 127.0.0.1."
    if not (DOCS / 'index.html').is_file(): pytest.fail(f"no site in {DOCS}: build it with nbdev_docs first (it needs Quarto)", pytrace=False)
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args): pass
    handler = functools.partial(Quiet, directory=str(DOCS))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_address[1]}/'
    server.shutdown()


@pytest.fixture(scope='module')
def browser():
    if sync_playwright is None: pytest.fail("tests/test_site.py needs playwright, a dev requirement of craft: pip install -e '.[dev]'", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_executable(), args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope='module')
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ['CRAFT_ARTIFACTS']) if os.environ.get('CRAFT_ARTIFACTS') else tmp_path_factory.mktemp('artifacts')
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_the_site_has_every_chapter():
    for name in EXPECTED: assert (DOCS / name).is_file(), name
    assert len(pages()) >= 17, pages()


@pytest.mark.parametrize('name', pages() if DOCS.is_dir() else ['index.html'])
def test_page(browser, site, artifacts, name):
    "Every request stays on the site and succeeds, every formula is rendered, and the chapter shows its results."
    page = browser.new_page(viewport={'width': 1280, 'height': 900})
    requests, failed, host = [], [], urlsplit(site).netloc
    page.on('request', lambda r: requests.append(r.url))
    page.on('requestfailed', lambda r: failed.append(f'{r.url} ({r.failure})'))
    page.on('response', lambda r: failed.append(f'{r.url} ({r.status})') if r.status >= 400 else None)
    page.goto(site + name, wait_until='networkidle')
    elsewhere = [u for u in requests if not u.startswith('data:') and urlsplit(u).netloc != host]
    assert elsewhere == [], elsewhere
    assert failed == [], failed
    prose = page.evaluate("""() => { const b = document.querySelector('main') || document.body; const c = b.cloneNode(true);
        c.querySelectorAll('pre, code, .katex-mathml, script, style').forEach(e => e.remove()); return c.textContent; }""")
    assert not RAW_TEX.search(prose), f"raw TeX on {name}: ...{prose[max(0, RAW_TEX.search(prose).start() - 80):][:160]}..."
    assert page.locator('span.math').count() == page.locator('span.math .katex').count()   # KaTeX rendered each one
    wide = page.evaluate("() => [...document.querySelectorAll('main img')].filter(i => i.getBoundingClientRect().right > "
                         "document.querySelector('main').getBoundingClientRect().right + 1).map(i => i.getAttribute('src'))")
    assert wide == [], f"{name}: images wider than the text column, cut off: {wide}"
    want = EXPECTED.get(name, {})
    cells = lambda code: page.locator('.cell', has=page.locator('code', has_text=code)).locator('.cell-output, .cell-output-display')
    for code, n in want.get('figures', {}).items():
        assert cells(code).locator('img').count() >= n, f"{name}: fewer than {n} images under the cells with {code!r}"
    for code in want.get('tables', []): assert cells(code).locator('table').count() >= 1, f"{name}: no table under the cell with {code!r}"
    for code in want.get('text', []):
        shown = cells(code).all_text_contents()
        assert len(''.join(shown).strip()) >= 40, f"{name}: the cell with {code!r} shows {shown}"
    if name in SCREENSHOTS:
        if SCREENSHOTS[name]: page.locator(SCREENSHOTS[name]).first.evaluate("e => e.scrollIntoView({block: 'start'})")
        page.screenshot(path=artifacts / f"site-{name.removesuffix('.html')}.png")
    page.close()


def test_search_finds_generate(browser, site):
    "The search box (Quarto's, over search.json, on the site itself) finds `generate`."
    page = browser.new_page()
    page.goto(site + 'index.html', wait_until='networkidle')
    page.locator('#quarto-search').click()
    page.keyboard.type('generate')
    hits = page.locator('.aa-Item')
    expect(hits.first).to_be_visible(timeout=10_000)
    assert any('generate' in t for t in hits.all_text_contents()), hits.all_text_contents()
    page.close()
