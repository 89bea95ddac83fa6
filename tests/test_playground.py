"Pages in a real browser (Debian's chromium, driven by Playwright): `craft serve`'s playground at / and docs at /docs, offline, and the notebook sampler in JupyterLab."
import os, re, shutil, socket, subprocess, sys, threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

try: from playwright.sync_api import expect, sync_playwright
except ImportError: sync_playwright = None

from craft.rundir import load_checkpoint
from craft.sampling import CONTROLS, generate
from conftest import ENV, Server   # fixtures: served_run
from browser import chromium_executable

# Headless, and no traffic of the browser's own: the only requests are the page's.
FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run']


@pytest.fixture(scope='module')
def browser():
    "Chromium launched by Playwright: Debian's on PATH, else Playwright's own, else one the test installs (tests/browser.py)."
    if sync_playwright is None: pytest.fail("tests/test_playground.py needs playwright, a dev requirement of craft: pip install -e '.[dev]'", pytrace=False)
    chromium = chromium_executable()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope='module')
def server(served_run):
    "`craft serve` on a free port of 127.0.0.1, float32 on the CPU (so that a seed gives `generate`'s text here too)."
    s = Server([sys.executable, '-m', 'craft.cli', 'serve', str(served_run), '--port', '0', '--device', 'cpu', '--dtype', 'float32',
                '--log-level', 'warning'])
    yield s
    s.stop()
    assert 'Traceback' not in s.log, s.log


@pytest.fixture(scope='module')
def artifacts(tmp_path_factory) -> Path:
    "Where the screenshots go: $CRAFT_ARTIFACTS if set, else a pytest temporary folder (printed)."
    folder = Path(os.environ['CRAFT_ARTIFACTS']) if os.environ.get('CRAFT_ARTIFACTS') else tmp_path_factory.mktemp('artifacts')
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Page:
    "A browser page on the server, recording every request it makes and every error it reports."
    def __init__(self, browser, server, path:str, width:int=1280, height:int=860, **options):
        self.page = browser.new_page(viewport={'width': width, 'height': height}, **options)
        self.requests, self.errors, self.host = [], [], urlsplit(server.url).netloc
        self.page.on('request', lambda r: self.requests.append(r.url))
        self.page.on('pageerror', lambda e: self.errors.append(str(e)))
        self.page.on('console', lambda m: self.errors.append(m.text) if m.type == 'error' else None)
        self.page.goto(server.url + path)

    def elsewhere(self) -> list[str]:
        "The requests to any other host than the server's."
        return [u for u in self.requests if not u.startswith('data:') and urlsplit(u).netloc != self.host]

    def screenshot(self, path:Path):
        self.page.screenshot(path=path, full_page=True)
        print(f"screenshot: {path}")


LENGTH = next(c.default for c in CONTROLS if c.name == 'max_new_tokens')   # the page's length, from the table of settings


def generated(page, sample:int=0) -> str: return page.locator('#output .generated').nth(sample).text_content()


def test_playground(browser, server, served_run, artifacts):
    "Type a prompt, move a slider, Generate: the text streams in as `generate` writes it; clicking a character shows what the model saw."
    p = Page(browser, server, '/')
    page = p.page
    expect(page.locator('#model')).to_contain_text(re.compile(r'tiny · [\d.]+K parameters · step \d+ · train loss [\d.]+ · val loss [\d.]+'))
    page.fill('#prompt', 'KING')
    page.fill('#seed', '7')
    page.focus('#temperature')
    page.keyboard.press('ArrowLeft')
    page.keyboard.press('ArrowLeft')                                       # 0.8 -> 0.7
    expect(page.locator('output[for=temperature]')).to_have_text('0.7')
    page.click('#generate')
    expect(page.locator('#output .generated span').first).to_be_attached()         # streamed text arrives
    expect(page.locator('#status')).to_contain_text('characters/s; seed 7', timeout=30_000)
    model, tok, _ = load_checkpoint(served_run, 'cpu')
    assert generated(page) == generate(model, tok, 'KING', max_new_tokens=LENGTH, seed=7, temperature=0.7)[0]
    assert page.locator('#output .prompt-text').text_content() == 'KING'

    page.locator('#output .generated span').nth(9).click()                         # what the model saw at the 10th character
    expect(page.locator('#position')).to_have_text(f'character 10 of {LENGTH}')
    chosen = generated(page)[9]
    bars = page.locator('#chart .bar')
    assert 1 <= bars.count() <= 11 and page.locator('#chart .chosen').count() == 1
    chosen_label = page.locator('#chart .char').nth(page.locator('#chart .bar').evaluate_all("bars => bars.findIndex(b => b.classList.contains('chosen'))"))
    assert chosen_label.text_content() == {' ': '␣', '\n': '⏎'}.get(chosen, chosen)
    percents = [float(t.rstrip('%')) for t in page.locator('#chart .pct').all_text_contents() if t[0].isdigit()]
    assert percents[:-1] == sorted(percents[:-1], reverse=True)             # the likeliest first (the drawn one may come last)
    assert 0 < sum(percents) <= 100.5
    page.click('#next')
    expect(page.locator('#position')).to_have_text(f'character 11 of {LENGTH}')
    p.screenshot(artifacts / 'playground.png')

    page.fill('#prompt', 'Señor')                                          # outside the vocabulary: the page's own words
    page.click('#generate')
    expect(page.locator('#status.error')).to_have_text("these characters are not in the model's alphabet: ñ — remove them, or tick 'drop unknown characters'")
    page.fill('#prompt', 'KING')
    page.fill('#seed', '')
    page.locator('#max_new_tokens').evaluate("e => { e.value = e.max; e.dispatchEvent(new Event('input')) }")
    network = page.context.new_cdp_session(page)            # a slow line, so that a fast machine cannot finish before Stop
    network.send('Network.enable')
    network.send('Network.emulateNetworkConditions', {'offline': False, 'latency': 0, 'downloadThroughput': 4000, 'uploadThroughput': -1})
    page.click('#generate')
    expect(page.locator('#output .generated span').first).to_be_attached()
    page.click('#stop')
    expect(page.locator('#status')).to_contain_text('stopped after')
    assert p.elsewhere() == [], p.elsewhere()
    assert p.errors == [], p.errors


def test_playground_on_a_phone(browser, server, artifacts):
    "On a phone-sized screen the page is one column that fits the width, and works the same."
    p = Page(browser, server, '/', width=390, height=844)
    page = p.page
    expect(page.locator('#model')).to_contain_text('parameters')
    page.fill('#seed', '3')
    page.click('#generate')
    expect(page.locator('#status')).to_contain_text('characters/s', timeout=30_000)
    page.locator('#output .generated span').nth(4).click()
    expect(page.locator('#chart .chosen')).to_have_count(1)
    assert page.evaluate('document.documentElement.scrollWidth') <= 390
    boxes = [page.locator(s).bounding_box() for s in ('#controls', '#results')]
    assert boxes[0]['y'] + boxes[0]['height'] <= boxes[1]['y']             # stacked, not side by side
    p.screenshot(artifacts / 'playground-phone.png')
    assert p.elsewhere() == [] and p.errors == [], (p.elsewhere(), p.errors)



def generate_and_wait(page, timeout=60_000):
    page.click('#generate')
    expect(page.locator('#status')).to_contain_text('characters/s', timeout=timeout)


def test_playground_fixes(browser, server, served_run, artifacts):
    "Issue #26's playground fixes at 1280×800: the box follows the stream and the chart stays in view; the context is the prompt that was sent; errors in the page's words; Ctrl+Enter, copy, continue from here, stop strings, samples, the hint that stays."
    model = load_checkpoint(served_run, 'cpu')[:2]
    p = Page(browser, server, '/', width=1280, height=800, permissions=['clipboard-read', 'clipboard-write'])
    page = p.page
    expect(page.locator('#model')).to_contain_text('parameters')
    page.fill('#prompt', 'KING')
    page.fill('#seed', '12')
    page.locator('#max_new_tokens').evaluate("e => { e.value = 2000; e.dispatchEvent(new Event('input')) }")
    page.click('#generate')
    page.wait_for_function("document.querySelectorAll('#output .generated span').length > 1200", timeout=60_000)
    box = page.locator('#output').evaluate("o => ({top: o.scrollTop, bottom: o.scrollHeight - o.clientHeight})")
    assert box['bottom'] > 0 and box['top'] >= box['bottom'] - 30, box                  # the box has followed the text
    expect(page.locator('#status')).to_contain_text('characters/s', timeout=60_000)
    out, mark = page.locator('#output').bounding_box(), page.locator('#output .selected').bounding_box()
    assert out['y'] <= mark['y'] and mark['y'] + mark['height'] <= out['y'] + out['height'] + 1, (out, mark)   # the followed character is in view
    chart = page.locator('#chart').bounding_box()
    assert chart['y'] + chart['height'] <= 800, chart                                  # the bars are above the fold
    assert page.locator('#hint').is_visible()                                           # the legend stays
    p.screenshot(artifacts / 'playground-1280x800.png')

    page.locator('#max_new_tokens').evaluate("e => { e.value = 2000; e.dispatchEvent(new Event('input')) }")
    page.click('#generate')                                                              # scrolled up to read, the box stays there
    page.wait_for_function("document.querySelectorAll('#output .generated span').length > 600", timeout=60_000)
    page.locator('#output').evaluate('o => { o.scrollTop = 0 }')
    page.wait_for_function("document.querySelectorAll('#output .generated span').length > 900", timeout=60_000)
    assert page.locator('#output').evaluate('o => o.scrollTop') == 0
    if page.locator('#stop').is_enabled(): page.click('#stop')
    expect(page.locator('#generate')).to_be_enabled(timeout=60_000)

    page.fill('#prompt', 'QUEEN')                                                        # edit the prompt after generating
    page.locator('#output .generated span').nth(3).click()
    expect(page.locator('#context')).to_have_text('…KING' + ''.join({' ': '␣', '\n': '⏎'}.get(c, c) for c in generated(page)[:4]))

    page.fill('#prompt', 'Señor “x”')
    page.keyboard.press('Control+Enter')
    expect(page.locator('#status.error')).to_have_text("these characters are not in the model's alphabet: ñ “ ” — remove them, or tick 'drop unknown characters'")
    page.check('#drop')
    page.locator('#max_new_tokens').evaluate("e => { e.value = 40; e.dispatchEvent(new Event('input')) }")
    page.locator('#prompt').focus()
    page.keyboard.press('Control+Enter')                                                 # the shortcut generates
    expect(page.locator('#status')).to_contain_text('40 characters in', timeout=30_000)
    assert page.locator('#output .prompt-text').text_content() == 'Seor x'
    page.fill('#prompt', '')
    page.click('#generate')
    expect(page.locator('#status.error')).to_contain_text('the prompt is empty')
    page.fill('#seed', '99999999999999999999')
    page.fill('#prompt', 'KING')
    page.click('#generate')
    expect(page.locator('#status.error')).to_contain_text('below 2^63')

    page.fill('#seed', '5')                                                              # two samples, stopped at a newline or 'e'
    page.select_option('#num_samples', '2')
    page.fill('#stop-strings', '\\n | e')
    generate_and_wait(page)
    expected = generate(*model, 'KING', max_new_tokens=40, seed=5, num_samples=2, stop=['\n', 'e'], temperature=0.8)
    assert [generated(page, 0), generated(page, 1)] == expected
    expect(page.locator('#output .sample .label').nth(1)).to_have_text('sample 2')

    page.select_option('#num_samples', '1')
    page.fill('#stop-strings', '')
    generate_and_wait(page)
    first = generated(page)
    page.locator('#output .generated span').nth(9).click()
    page.click('#continue')                                                              # the first 10 characters become the prompt
    expect(page.locator('#prompt')).to_have_value('KING' + first[:10])
    expect(page.locator('#status')).to_contain_text('characters/s', timeout=30_000)
    assert page.locator('#output .prompt-text').text_content() == 'KING' + first[:10]
    page.click('#copy')
    expect(page.locator('#status')).to_contain_text(f"copied {4 + 10 + 40} characters")
    assert page.evaluate('navigator.clipboard.readText()') == 'KING' + first[:10] + generated(page)
    assert p.elsewhere() == [] and p.errors == [], (p.elsewhere(), p.errors)


def test_seeds_round_trip_in_javascript(browser, server, served_run):
    "From JavaScript: a returned seed, sent back as JSON, gives the same text; a seed above 2^53 goes as a string and comes back as one."
    model = load_checkpoint(served_run, 'cpu')[:2]
    p = Page(browser, server, '/')
    result = p.page.evaluate("""async () => {
        const post = async (path, body) => (await fetch(path, {method: 'POST', headers: {'content-type': 'application/json'},
                                                               body: JSON.stringify(body)})).json();
        const body = {prompt: 'KING', max_new_tokens: 30};
        const first = await post('/v1/generate', body);
        const again = await post('/v1/generate', {...body, seed: first.seed});
        const big = await post('/v1/generate', {...body, seed: '5860268007214108586'});
        const bigAgain = await post('/v1/generate', {...body, seed: big.seed});
        const openai = await post('/v1/completions', {prompt: 'KING', max_tokens: 30});
        const openaiAgain = await post('/v1/completions', {prompt: 'KING', max_tokens: 30, seed: openai.seed});
        return {first, again, big, bigAgain, openai, openaiAgain, safe: Number.isSafeInteger(first.seed)};
    }""")
    assert result['safe'] and result['first']['texts'] == result['again']['texts'], result
    assert result['big']['seed'] == '5860268007214108586' and result['bigAgain']['texts'] == result['big']['texts']
    assert result['big']['texts'] == generate(*model, 'KING', max_new_tokens=30, seed=5860268007214108586, temperature=0.8)
    assert result['openai']['choices'][0]['text'] == result['openaiAgain']['choices'][0]['text']



def test_playground_with_an_api_key(browser, served_run):
    "On a server with --api-key, the page asks for the key, says so when it is wrong, and with the right one generates."
    s = Server([sys.executable, '-m', 'craft.cli', 'serve', str(served_run), '--port', '0', '--device', 'cpu', '--dtype', 'float32',
                '--log-level', 'warning', '--api-key', 'page-key'])
    try:
        p = Page(browser, s, '/')
        page = p.page
        expect(page.locator('#model')).to_have_text('this server needs an API key')
        page.fill('#key', 'wrong')
        page.click('#key-save')
        expect(page.locator('#status.error')).to_contain_text('not this server')
        page.fill('#key', 'page-key')
        page.click('#key-save')
        expect(page.locator('#model')).to_contain_text('parameters')
        generate_and_wait(page)
        assert len(generated(page)) == LENGTH
    finally: s.stop()
    assert 'Traceback' not in s.log, s.log


@pytest.fixture(scope='module')
def jupyterlab(served_run, tmp_path_factory):
    "JupyterLab on a free port of 127.0.0.1, with its settings in a temporary folder and a notebook that shows `sampler_app`."
    import nbformat
    root = tmp_path_factory.mktemp('jupyterlab')
    code = (f"import torch; torch.set_num_threads(1)\nfrom craft.widget import sampler_app\n"
            f"sampler_app({str(served_run)!r}, device='cpu', dtype='float32', prompt='KING', max_new_tokens=120, seed=5)")
    kernel = {'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}}
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)], metadata=kernel), root / 'sampler.ipynb')
    news = root / 'settings' / '@jupyterlab' / 'apputils-extension' / 'notification.jupyterlab-settings'
    news.parent.mkdir(parents=True); news.write_text('{"fetchNews": "false"}')    # no pop-up asking about news
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    env = {**ENV, **{f'JUPYTER_{d}_DIR': str(root / d.lower()) for d in ('CONFIG', 'DATA', 'RUNTIME')}}
    lab = subprocess.Popen([sys.executable, '-m', 'jupyterlab', '--no-browser', f'--port={port}', '--ip=127.0.0.1', '--allow-root', '--IdentityProvider.token=craft',
                            f'--ServerApp.root_dir={root}', f'--LabApp.user_settings_dir={root / "settings"}',
                            f'--LabApp.workspaces_dir={root / "workspaces"}'], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while f'127.0.0.1:{port}' not in (line := lab.stderr.readline()): assert line, 'JupyterLab did not start'
        threading.Thread(target=lab.stderr.read, daemon=True).start()                 # keep the pipe from filling
        yield f'http://127.0.0.1:{port}'
    finally:
        lab.terminate()
        try: lab.wait(20)
        except subprocess.TimeoutExpired: lab.kill(); lab.wait(10)


def test_sampler_widget_in_jupyterlab(browser, jupyterlab, artifacts):
    "The notebook sampler in a real JupyterLab: labels in full, Generate streams the text after its prompt, and the bars show the next character."
    page = browser.new_page(viewport={'width': 1280, 'height': 900})
    page.route(re.compile(r'^(?!http://127\.0\.0\.1[:/]).*'), lambda route: route.abort())   # JupyterLab may look for news: nowhere but here
    page.goto(f'{jupyterlab}/lab/tree/sampler.ipynb?token=craft')
    try: run_the_sampler(page)
    except Exception:
        page.screenshot(path=artifacts / 'sampler-widget-failed.png')
        print(f"screenshot of the failure: {artifacts / 'sampler-widget-failed.png'}")
        raise
    page.locator('.jp-Notebook').screenshot(path=artifacts / 'sampler-widget.png')
    print(f"screenshot: {artifacts / 'sampler-widget.png'}")


def run_the_sampler(page):
    "Run the notebook's cell once the kernel is up, check the widget, press Generate, check what it shows."
    expect(page.get_by_text(re.compile(r'\| Idle$'))).to_be_visible(timeout=120_000)   # the kernel has started
    prompt = page.locator('.jp-Cell .jp-InputPrompt').first
    for attempt in range(3):                  # a key pressed while the notebook is still wiring itself up is lost
        page.locator('.jp-Cell .cm-content').first.click(timeout=60_000)
        page.keyboard.press('Shift+Enter')
        try: expect(prompt).to_have_text(re.compile(r'\[[*\d]+\]'), timeout=15_000); break   # [*]: running, [1]: ran
        except AssertionError:
            if attempt == 2: raise
    generate_button = page.get_by_role('button', name='Generate')
    expect(generate_button).to_be_visible(timeout=60_000)
    labels = page.locator('.widget-slider .widget-label')
    expect(labels).to_have_count(sum(1 for c in CONTROLS if c.slider))   # one slider per row of the table that has one
    try: page.wait_for_function("[...document.querySelectorAll('.widget-slider .widget-label')].every(l => l.scrollWidth <= l.clientWidth)",
                                timeout=10_000)                                      # once laid out, no label is cut short
    except Exception: pytest.fail(f"labels cut short: {labels.evaluate_all('ls => ls.filter(l => l.scrollWidth > l.clientWidth).map(l => l.textContent)')}")
    generate_button.click()
    expect(page.locator('.widget-label', has_text='characters/s')).to_contain_text('120 characters in', timeout=60_000)
    expect(page.locator('.widget-html pre span').first).to_have_text('KING')             # the prompt, then the text
    assert len(page.locator('.widget-html pre').first.text_content()) == 4 + 120
    expect(page.locator('.widget-html', has_text='What the model sees').locator('tr').first).to_be_visible()


def test_docs_try_it_out(browser, server, artifacts):
    "/docs loads with nothing from elsewhere, and its pre-filled request, executed as it stands, succeeds."
    p = Page(browser, server, '/docs')
    page = p.page
    page.locator('.opblock-post .opblock-summary').first.click()
    page.get_by_role('button', name='Try it out').click()
    body = page.locator('.body-param textarea').input_value()
    assert '"seed": null' in body and '"stop"' not in body, body
    page.get_by_role('button', name='Execute').click()
    status = page.locator('.live-responses-table .response .response-col_status').first
    expect(status).to_have_text('200', timeout=30_000)
    expect(page.locator('.live-responses-table .response .response-col_description')).to_contain_text('"finish_reason": "length"')
    p.screenshot(artifacts / 'docs.png')
    assert p.elsewhere() == [] and p.errors == [], (p.elsewhere(), p.errors)
