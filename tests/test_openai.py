"`craft serve` for clients craft does not write, on loopback: the official `openai` client, API keys, /metrics, and the limits that hold under a flood, unread streams and slow connections."
from __future__ import annotations
import asyncio, math, os, socket, subprocess, sys, time
from pathlib import Path

import pytest

try: import openai
except ImportError: openai = None
try: from prometheus_client.parser import text_string_to_metric_families
except ImportError: text_string_to_metric_families = None

from craft.sampling import generate
from conftest import ENV, Server, health, httpx, serve   # fixtures: served_run, model


@pytest.fixture(autouse=True)
def dev_dependencies():
    "These tests need openai, prometheus_client and httpx2 (dev requirements): without them they fail, saying so."
    if openai is None or text_string_to_metric_families is None or httpx is None:
        pytest.fail("tests/test_openai.py needs openai, prometheus_client and httpx2: pip install -e '.[dev]'", pytrace=False)


@pytest.fixture(scope='module')
def server(served_run):
    s = serve(served_run, max_slots=16, max_new_tokens_cap=5000)
    yield s
    s.stop()
    assert 'Traceback' not in s.log, s.log


def client(server, key='unused', **kw) -> 'openai.OpenAI':
    "The official client on `server`; no retries, so that a 429 or 5xx shows."
    return openai.OpenAI(base_url=f'{server.url}/v1', api_key=key, max_retries=0, timeout=60, **kw)


def craft_sample(run, prompt:str, n:int, seed:int, max_new_tokens:int, *args) -> str:
    "What `craft sample` prints (float32 weights on the CPU, as the servers run)."
    r = subprocess.run([sys.executable, '-m', 'craft.cli', 'sample', str(run), '--prompt', prompt, '--num-samples', str(n), '--seed', str(seed),
                        '--max-new-tokens', str(max_new_tokens), '--device', 'cpu', '--dtype', 'float32', '--quantize', 'none', *map(str, args)],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    return r.stdout


def as_printed(texts:list[str]) -> str:
    "`texts` as `craft sample` prints them: a header per sample when there are several, each on a new line."
    out = ''
    for i, text in enumerate(texts):
        if out and not out.endswith('\n'): out += '\n'
        out += (f"--- sample {i + 1} ---\n" if len(texts) > 1 else '') + text
    return out if out.endswith('\n') else out + '\n'


def model_name(server) -> str: return httpx.get(f'{server.url}/v1/models', timeout=10).json()['data'][0]['id']


def test_plain_equals_craft_sample(server, served_run):
    "A plain completion is `craft sample`'s text for the same seed and settings, with OpenAI's fields."
    c = client(server).completions.create(model=model_name(server), prompt='KING', max_tokens=60, seed=11, temperature=0.8)
    assert c.object == 'text_completion' and c.choices[0].finish_reason == 'length' and c.choices[0].index == 0
    assert as_printed([c.choices[0].text]) == craft_sample(served_run, 'KING', 1, 11, 60)
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (4, 60, 64)


def test_streamed(server):
    "A stream's pieces make the plain text; the last chunk of the choice has its finish_reason; usage comes last when asked."
    kw = dict(model=model_name(server), prompt='QUEEN', max_tokens=80, seed=3, temperature=1.0, top_p=0.9)
    plain = client(server).completions.create(**kw)
    chunks = list(client(server).completions.create(**kw, stream=True, stream_options={'include_usage': True}))
    assert ''.join(ch.text for c in chunks for ch in c.choices) == plain.choices[0].text
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ['length']
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 80


def test_n_and_craft_settings(server, served_run):
    "n > 1 gives `craft sample --num-samples n`; craft's own settings go as extra fields, as vLLM takes them."
    c = client(server).completions.create(model=model_name(server), prompt='ROMEO:', max_tokens=40, n=3, seed=5, temperature=0.9,
                                          extra_body={'top_k': 10, 'repetition_penalty': 1.2})
    assert [ch.index for ch in c.choices] == [0, 1, 2]
    assert as_printed([ch.text for ch in c.choices]) == craft_sample(served_run, 'ROMEO:', 3, 5, 40, '--temperature', 0.9, '--top-k', 10,
                                                                     '--repetition-penalty', 1.2)


def test_stop(server, model):
    "Stop strings end a choice, without the stop string, finish_reason 'stop'; a list of prompts gives n choices each, in order."
    c = client(server).completions.create(model=model_name(server), prompt=['KING', 'QUEEN'], max_tokens=200, seed=2, n=2, stop=['\n', 'e'],
                                          temperature=0.8)
    expected = [t for p in ('KING', 'QUEEN') for t in generate(*model, p, max_new_tokens=200, seed=2, num_samples=2, stop=['\n', 'e'], temperature=0.8)]
    assert [ch.text for ch in c.choices] == expected
    assert [ch.finish_reason for ch in c.choices] == ['stop'] * 4 and not any('e' in t or '\n' in t for t in expected)


def test_logprobs_and_echo(server):
    "logprobs: for each character, its log-probability and the k likeliest, as /v1/generate's top_probs shows them; echo puts the prompt first."
    c = client(server).completions.create(model=model_name(server), prompt='KING', max_tokens=30, seed=4, logprobs=5, echo=True, temperature=0.8)
    ch = c.choices[0]
    lp = ch.logprobs
    assert ch.text.startswith('KING') and lp.tokens == list(ch.text) and lp.text_offset == list(range(len(ch.text)))
    assert lp.token_logprobs[:4] == [None] * 4 and lp.top_logprobs[:4] == [None] * 4
    assert all(len(top) == 5 and max(top.values()) >= p for top, p in zip(lp.top_logprobs[4:], lp.token_logprobs[4:]))
    seen = httpx.post(f'{server.url}/v1/generate', json={'prompt': 'KING', 'max_new_tokens': 30, 'seed': 4, 'top_probs': 5}, timeout=30).json()
    assert seen['texts'][0] == ch.text[4:]
    assert [round(math.exp(x), 5) for x in lp.token_logprobs[4:]] == pytest.approx([p['prob'] for p in seen['probs'][0]], abs=2e-5)
    stream = list(client(server).completions.create(model=model_name(server), prompt='KING', max_tokens=30, seed=4, logprobs=5, echo=True,
                                                    temperature=0.8, stream=True))
    pieces = [ch for c in stream for ch in c.choices if ch.logprobs]
    assert [t for ch in pieces for t in ch.logprobs.tokens] == lp.tokens
    assert [o for ch in pieces for o in ch.logprobs.text_offset] == lp.text_offset


def test_errors_are_openai_errors(server):
    "Bad requests raise the `openai` client's own errors, with OpenAI's error object."
    c = client(server)
    with pytest.raises(openai.UnprocessableEntityError) as e: c.completions.create(model=model_name(server), prompt='KING', n=17)
    assert e.value.body['param'] == 'n' and 'less than or equal to 16' in e.value.body['message']
    with pytest.raises(openai.NotFoundError) as e: c.completions.create(model='gpt-4', prompt='KING')
    assert e.value.body['code'] == 'model_not_found'
    with pytest.raises(openai.UnprocessableEntityError) as e: c.completions.create(model=model_name(server), prompt='café')
    assert "'é' (U+00E9)" in e.value.body['message']
    assert [m.id for m in c.models.list()] == [model_name(server)] and c.models.retrieve(model_name(server)).owned_by == 'craft'


def metrics(url:str, headers=None) -> dict:
    "/metrics parsed by prometheus_client's parser: value by (name, labels)."
    text = httpx.get(f'{url}/metrics', headers=headers, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_api_key_and_metrics(served_run):
    "With --api-key: every route but /health and the pages needs it; /metrics parses, and its counters match the requests sent."
    s = serve(served_run, max_slots=4, api_key='k-123', host='127.0.0.1')
    try:
        auth = {'Authorization': 'Bearer k-123'}
        with pytest.raises(openai.AuthenticationError): client(s, 'wrong').completions.create(model='tiny', prompt='KING')
        assert httpx.get(f'{s.url}/health', timeout=10).status_code == 200 and httpx.get(f'{s.url}/metrics', timeout=10).status_code == 401
        good = client(s, 'k-123')
        for i in range(3): good.completions.create(model=model_name_of(s, auth), prompt='KING', max_tokens=10, seed=i)
        for _ in good.completions.create(model='tiny', prompt='KING', max_tokens=10, stream=True): pass
        for i in range(2): assert httpx.post(f'{s.url}/v1/generate', json={'prompt': 'KING', 'max_new_tokens': 5}, headers=auth, timeout=30).status_code == 200
        assert httpx.post(f'{s.url}/v1/generate', json={'prompt': 'KING', 'temperature': 'hot'}, headers=auth, timeout=30).status_code == 422
        m = metrics(s.url, auth)
        count = lambda route, status: m.get(('craft_requests_total', (('route', route), ('status', status))), 0)
        assert (count('/v1/completions', '200'), count('/v1/generate', '200'), count('/v1/generate', '422')) == (4, 2, 1)
        assert (count('/v1/completions', '401'), count('/metrics', '401'), count('/health', '200')) == (1, 1, 1)
        assert m['craft_generated_tokens_total', ()] == 3 * 10 + 10 + 2 * 5
        assert m['craft_time_to_first_token_seconds_count', ()] == 6 and m['craft_time_per_output_token_seconds_count', ()] == 6
        assert (m['craft_queue_length', ()], m['craft_active_rows', ()], m['craft_max_slots', ()]) == (0, 0, 4)
    finally: s.stop()
    assert 'Traceback' not in s.log, s.log


def model_name_of(server, headers) -> str: return httpx.get(f'{server.url}/v1/models', headers=headers, timeout=10).json()['data'][0]['id']


def test_host_needs_a_key(served_run):
    "A --host other machines reach, without a key, is refused with one line that says why; with a key (even from $CRAFT_API_KEY) it serves."
    r = subprocess.run([sys.executable, '-m', 'craft.cli', 'serve', str(served_run), '--host', '0.0.0.0', '--port', '0'],
                       capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and 'no API key: pass --api-key KEY' in r.stderr, r.stderr
    s = Server([sys.executable, '-m', 'craft.cli', 'serve', str(served_run), '--host', '0.0.0.0', '--port', '0', '--device', 'cpu',
                '--log-level', 'warning'], env={**ENV, 'CRAFT_API_KEY': 'from-env'})
    try:
        port = s.url.rsplit(':', 1)[1]
        assert 'API key required' in s.log
        assert httpx.get(f'http://127.0.0.1:{port}/v1/model', timeout=10).status_code == 401
        assert httpx.get(f'http://127.0.0.1:{port}/v1/model', headers={'Authorization': 'Bearer from-env'}, timeout=10).status_code == 200
    finally: s.stop()


def rss_mb(pid:int) -> float:
    "Resident memory of process `pid`, in MB."
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmRSS:'): return int(line.split()[1]) / 1024


async def flood(url:str, n:int, body:dict) -> list[int]:
    "`n` clients at once, one request each; their status codes."
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=n), timeout=120) as c:
        async def one(i):
            return (await c.post('/v1/completions', json=body | {'seed': i})).status_code
        return await asyncio.gather(*(one(i) for i in range(n)))


def test_flood_of_256_clients(served_run):
    "256 clients at once on 16 rows and a queue of 32: only 200s and 429s (with Retry-After), no hang, memory bounded, no leaked rows."
    s = serve(served_run, max_slots=16, max_queue=32)
    try:
        before = rss_mb(s.process.pid)
        start = time.monotonic()
        codes = asyncio.run(asyncio.wait_for(flood(s.url, 256, {'prompt': 'KING', 'max_tokens': 64}), 120))
        took = time.monotonic() - start
        assert set(codes) <= {200, 429} and codes.count(200) >= 48 and codes.count(429) > 0, sorted(set(codes))
        h = health(s)
        assert (h['rows_in_use'], h['requests_running'], h['requests_waiting']) == (0, 0, 0), h
        grown = rss_mb(s.process.pid) - before
        print(f"256 clients: {codes.count(200)} answered, {codes.count(429)} told 429, in {took:.1f} s; resident memory +{grown:.0f} MB")
        assert grown < 200, grown
        m = metrics(s.url)
        assert m['craft_requests_total', (('route', '/v1/completions'), ('status', '429'))] == codes.count(429)
    finally: s.stop()
    assert 'Traceback' not in s.log, s.log


def open_unread_stream(url:str, body:bytes) -> socket.socket:
    "A connection that sends a streaming request and never reads the answer (a small receive buffer, as a stalled client has)."
    host, port = url.removeprefix('http://').rsplit(':', 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(b'POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s' % (len(body), body))
    return sock


def timed_request(url:str) -> float:
    start = time.perf_counter()
    r = httpx.post(f'{url}/v1/completions', json={'prompt': 'KING', 'max_tokens': 100, 'seed': 1}, timeout=120)
    assert r.status_code == 200
    return time.perf_counter() - start


@pytest.mark.slow
def test_100_unread_streams(served_run):
    "100 streams left open and unread: they are dropped, resident memory grows by under 100 MB, and a request meanwhile is as fast as on an idle server (within 2×)."
    s = serve(served_run, max_slots=64, max_new_tokens_cap=100_000)
    socks = []
    try:
        idle = min(timed_request(s.url) for _ in range(3))
        before = rss_mb(s.process.pid)
        body = b'{"prompt": "KING", "max_new_tokens": 40000, "stream": true, "top_probs": 20}'
        socks = [open_unread_stream(s.url, body) for _ in range(100)]
        deadline = time.monotonic() + 120
        while metrics(s.url).get(('craft_streams_dropped_total', ()), 0) < 100:
            assert time.monotonic() < deadline, (health(s), metrics(s.url).get(('craft_streams_dropped_total', ())))
            time.sleep(0.5)
        meanwhile = min(timed_request(s.url) for _ in range(3))
        grown = rss_mb(s.process.pid) - before
        print(f"idle {idle:.3f} s, with 100 unread streams open {meanwhile:.3f} s; resident memory +{grown:.0f} MB")
        assert grown < 100, grown
        assert meanwhile < 2 * idle + 0.05, (meanwhile, idle)
        assert health(s)['rows_in_use'] == 0
    finally:
        for sock in socks: sock.close()
        s.stop()
    assert 'Traceback' not in s.log, s.log


def test_slow_and_half_sent_requests(served_run):
    "50 half-sent headers and 50 trickled bodies are closed after --timeout-headers and --timeout-body; other requests are served meanwhile."
    s = serve(served_run, max_slots=4, timeout_headers=1.0, timeout_body=1.0)
    host, port = s.url.removeprefix('http://').rsplit(':', 1)
    socks = []
    try:
        for i in range(100):
            sock = socket.create_connection((host, int(port)), timeout=10)
            if i % 2: sock.sendall(b'POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"pro')
            else: sock.sendall(b'POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-')
            socks.append(sock)
        assert timed_request(s.url) < 30
        time.sleep(2.5)
        answers = []
        for sock in socks:
            data = b''
            while chunk := sock.recv(65536): data += chunk     # until the server closes it (a timeout of 10 s would raise)
            answers.append(data)
        assert all(a == b'' for a in answers[0::2]), answers[0]                         # headers never finished: closed, no answer
        assert all(a.startswith(b'HTTP/1.1 408') and b'--timeout-body' in a for a in answers[1::2]), answers[1]
    finally:
        for sock in socks: sock.close()
        s.stop()
    assert 'Traceback' not in s.log, s.log
