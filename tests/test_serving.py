"`craft serve` on loopback: the real server in a subprocess, every endpoint, bad input, 64 concurrent clients, disconnects, shutdown with requests in flight, and a schemathesis fuzz."
from __future__ import annotations
import asyncio, json, re, shutil, signal, subprocess, sys, threading, time
from pathlib import Path

import pytest
import torch

from craft.sampling import generate
from conftest import ENV, Server, health, httpx, serve   # fixtures: served_run, model


@pytest.fixture(autouse=True)
def dev_dependencies():
    "These tests need httpx2, a dev requirement: without it they fail, saying so."
    if httpx is None: pytest.fail("tests/test_serving.py needs httpx2, a dev requirement of craft: pip install -e '.[dev]'", pytrace=False)


@pytest.fixture(scope='module')
def server(served_run):
    "The main server: 16 slots, long generations allowed (for the disconnect tests)."
    s = serve(served_run, max_slots=16, max_prompt_chars=300, max_new_tokens_cap=5000, max_body_bytes=4096)
    yield s
    s.stop()
    assert 'Traceback' not in s.log, s.log


def post(server, timeout=30, **body) -> httpx.Response:
    return httpx.post(f'{server.url}/v1/generate', json=body, timeout=timeout)


def parse_events(text:str) -> list[tuple[str, dict]]:
    "Server-Sent Events as (event name, data)."
    events = []
    for block in text.split('\n\n'):
        if not block.strip(): continue
        fields = dict(line.split(': ', 1) for line in block.split('\n'))
        events.append((fields['event'], json.loads(fields['data'])))
    return events


def wait_until_idle(server, timeout=10) -> dict:
    "Poll /health until no rows are in use and nothing waits; return the last report."
    deadline = time.monotonic() + timeout
    while True:
        h = health(server)
        if (h['rows_in_use'], h['requests_running'], h['requests_waiting']) == (0, 0, 0) or time.monotonic() > deadline: return h
        time.sleep(0.05)


def test_binds_loopback_by_default(server):
    assert server.url.startswith('http://127.0.0.1:')


def test_health_and_model(server, model):
    _, tok = model
    for path in ('/health', '/v1/model'):
        r = httpx.get(server.url + path, timeout=10)
        assert r.status_code == 200
        info = r.json()
        assert info['status'] == 'ok' and info['device'] == 'cpu' and info['dtype'] == 'float32'
        assert info['vocab_size'] == tok.vocab_size and info['vocabulary'] == ''.join(tok.chars)
        assert info['config']['block_size'] == 32 and info['max_slots'] == 16
        assert info['limits'] == dict(max_prompt_chars=300, max_new_tokens=5000, max_samples=16, max_body_bytes=4096, max_queue=128,
                                      timeout_request_s=600.0, timeout_body_s=10.0)
        assert isinstance(info['requests_served'], int)
    before = health(server)['requests_served']
    assert post(server, prompt='KING', max_new_tokens=5).status_code == 200
    assert health(server)['requests_served'] == before + 1


def test_docs_and_schema(server):
    "/docs needs nothing from another host; the schema declares the stream's events as the JSON objects they are, and its example runs."
    docs = httpx.get(f'{server.url}/docs', timeout=10).text
    assert 'swagger' in docs.lower() and not re.search(r'(src|href)="(https?:)?//', docs), docs
    assert httpx.get(f'{server.url}/static-offline-docs/swagger-ui-bundle.js', timeout=10).status_code == 200
    schema = httpx.get(f'{server.url}/openapi.json', timeout=10).json()
    assert {'/v1/generate', '/health', '/v1/model'} <= set(schema['paths'])
    answers = schema['paths']['/v1/generate']['post']['responses']
    events = answers['200']['content']['text/event-stream']['schema']['oneOf']
    assert [e['$ref'].split('/')[-1] for e in events] == ['StreamChunk', 'GenerateResponse', 'StreamError']
    components = schema['components']['schemas']
    assert set(components['StreamChunk']['properties']) == {'sample', 'text', 'probs'} and 'error' in components['StreamError']['required']
    assert '503' in answers
    example = components['GenerateRequest']['examples'][0]
    assert example['seed'] is None and 'stop' not in example
    r = post(server, **example)
    assert r.status_code == 200 and r.json()['finish_reason'] == 'length', r.text


def test_integral_floats_are_integers(server, model):
    "JSON Schema's integer includes 51422917983491.0: the integer fields take integral floats, and still refuse 1.5."
    r = post(server, prompt='KING', max_new_tokens=20.0, seed=51422917983491.0, top_k=0.0, num_samples=1.0)
    assert r.status_code == 200, r.text
    assert r.json()['seed'] == 51422917983491 and r.json()['texts'] == generate(*model, 'KING', max_new_tokens=20, seed=51422917983491, temperature=0.8)
    for bad in (dict(seed=1.5), dict(max_new_tokens=float('1e300')), dict(top_k=True)):
        assert post(server, **bad).status_code == 422, bad


def test_top_probs(server, model):
    "With top_probs, every character comes with what the model saw; the text is the same as without, in the answer and the stream."
    body = dict(prompt='KING', max_new_tokens=50, seed=11, top_k=6, num_samples=2, stop=['\n\n'], top_probs=4)
    answer = post(server, **body).json()
    assert answer['texts'] == post(server, **{**body, 'top_probs': 0}).json()['texts']
    for text, probs in zip(answer['texts'], answer['probs']):
        assert ''.join(p['token'] for p in probs) == text
        for p in probs:
            tops = [t['prob'] for t in p['top']]
            assert len(tops) == 4 and tops == sorted(tops, reverse=True) and 0 < p['prob'] <= tops[0] and sum(tops) <= 1 + 1e-5
    with httpx.stream('POST', f'{server.url}/v1/generate', json={**body, 'stream': True}, timeout=30) as r:
        events = parse_events(r.read().decode())
    for sample in range(2):
        assert [p for name, d in events[:-1] if d['sample'] == sample for p in d['probs']] == answer['probs'][sample]
    greedy = post(server, prompt='KING', max_new_tokens=10, temperature=0, top_probs=3).json()['probs'][0]
    assert all(p['prob'] == 1 and p['top'] == [{'token': p['token'], 'prob': 1.0}] for p in greedy)
    assert post(server, prompt='KING', max_new_tokens=5).json()['probs'] is None


SETTINGS = [dict(prompt='KING', max_new_tokens=40, seed=1),
            dict(prompt='ROMEO:\n', max_new_tokens=70, seed=2, temperature=1.1, top_k=10, stop=['\n\n']),
            dict(prompt='a' * 50, max_new_tokens=50, seed=3, top_p=0.8, min_p=0.05, repetition_penalty=1.3, num_samples=3),
            dict(prompt='First', max_new_tokens=30, temperature=0, stop='e ')]


@pytest.mark.parametrize('settings', SETTINGS)
def test_same_seed_same_text_as_craft_sample(server, model, settings):
    r = post(server, **settings)
    assert r.status_code == 200, r.text
    answer = r.json()
    sample = {'temperature': 0.8, **{k: v for k, v in settings.items() if k != 'prompt'}}
    assert answer['texts'] == generate(*model, settings['prompt'], **sample)
    n = settings.get('num_samples', 1)
    assert len(answer['texts']) == n and answer['prompt_tokens'] == len(settings['prompt'])
    assert answer['finish_reason'] in ('stop', 'length') and answer['generated_tokens'] <= n * settings['max_new_tokens']
    assert set(answer['timing']) == {'queued_s', 'first_token_s', 'total_s', 'tokens_per_s'}
    if 'seed' in settings: assert answer['seed'] == settings['seed']


def test_stream(server):
    body = dict(prompt='KING', max_new_tokens=60, seed=5, num_samples=2, stop=['\n\n'])
    with httpx.stream('POST', f'{server.url}/v1/generate', json={**body, 'stream': True}, timeout=30) as r:
        assert r.status_code == 200 and r.headers['content-type'].startswith('text/event-stream')
        events = parse_events(r.read().decode())
    assert [name for name, _ in events[:-1]] == ['chunk'] * (len(events) - 1) and events[-1][0] == 'done'
    done = events[-1][1]
    for sample in range(2):
        assert ''.join(d['text'] for _, d in events[:-1] if d['sample'] == sample) == done['texts'][sample]
    assert done['texts'] == post(server, **body).json()['texts']


BAD = [  # (request keyword arguments, status, part of the message)
    (dict(content=b'{"prompt": "KING",'), 400, 'malformed JSON'),
    (dict(content=b'not json at all'), 400, 'malformed JSON'),
    (dict(json={'temperature': 'hot'}), 422, 'temperature: Input should be a valid number'),
    (dict(json={'prompt': 5}), 422, 'prompt: Input should be a valid string'),
    (dict(json={'max_new_tokens': 1.5}), 422, 'max_new_tokens: Input should be a valid integer'),
    (dict(json={'stream': 'yes'}), 422, 'stream: Input should be a valid boolean'),
    (dict(json={'stop': [1]}), 422, 'stop'),
    (dict(json={'seed': -1}), 422, 'seed: must be from 0 to 2**53 - 1'),
    (dict(json={'top_p': 2}), 422, 'top_p: Input should be less than or equal to 1'),
    (dict(json={'temperature': -1}), 422, 'temperature: Input should be greater than or equal to 0'),
    (dict(json={'temperature': 1e-9}), 422, 'temperature: Value error, must be 0 (greedy) or >= 1e-4'),
    (dict(json={'num_samples': 0}), 422, 'num_samples: Input should be greater than or equal to 1'),
    (dict(json={'num_samples': 17}), 422, 'num_samples: Input should be less than or equal to 16'),
    (dict(json={'prompt': 'Señor ¿qué?'}), 422, "prompt: text has 3 character(s) not in the tokenizer's vocabulary: 'ñ' (U+00F1) at index 2, '¿' (U+00BF) at index 6, 'é' (U+00E9) at index 9"),
    (dict(json={'prompt': 'a' * 301}), 422, 'prompt: String should have at most 300 characters'),
    (dict(json={'prompt': ''}), 422, 'prompt: String should have at least 1 character'),
    (dict(json={'max_new_tokens': 5001}), 422, 'max_new_tokens: Input should be less than or equal to 5000'),
    (dict(json={'colour': 'red'}), 422, 'colour: Extra inputs are not permitted'),
    (dict(json={'top_probs': 21}), 422, 'top_probs: Input should be less than or equal to 20'),
    (dict(json={'top_probs': 20, 'max_new_tokens': 5000, 'num_samples': 16}), 422, '1,600,000 alternatives, more than 1,000,000; ask for fewer'),
    (dict(json=[1, 2]), 422, 'request body: Input should be a valid dictionary'),
    (dict(json={'prompt': 'a' * 5000}), 413, "larger than this server's limit of 4096 bytes"),
    (dict(content=(b'x' * 1000 for _ in range(5))), 413, "limit of 4096 bytes"),    # chunked: no Content-Length
]


@pytest.mark.parametrize('request_args, status, message', BAD)
def test_bad_input(server, request_args, status, message):
    r = httpx.post(f'{server.url}/v1/generate', headers={'content-type': 'application/json'}, timeout=30, **request_args)
    assert r.status_code == status, r.text
    assert message in r.json()['error'], r.json()


def test_not_found_and_method(server):
    assert httpx.get(f'{server.url}/nothing', timeout=10).json()['error'] == 'Not Found'
    r = httpx.get(f'{server.url}/v1/generate', timeout=10)
    assert r.status_code == 405 and 'POST' in r.headers['allow']


def client_body(i:int) -> dict:
    "Varied seeded settings for client `i`."
    return dict(prompt=['KING', 'ROMEO:\n', 'a', 'First Citizen:\n'][i % 4], max_new_tokens=20 + (i * 7) % 45, seed=i,
                temperature=[0.8, 1.0, 0.0, 1.3][i % 4], top_k=[0, 10][i % 2], top_p=[1.0, 0.9, 1.0][i % 3],
                stop=[None, ['\n\n'], ['e ']][i % 3], num_samples=1 + (i % 9 == 0))


async def one_client(client:httpx.AsyncClient, i:int, stream:bool, disconnect:bool=False) -> list[str]|None:
    ("Client `i`: one request, streamed or not; a disconnecting client reads two events and hangs up "
     "(its request has no stop string and 5,000 characters to go, so only the hang-up can end it).")
    body = client_body(i) | ({'max_new_tokens': 5000, 'stop': None} if disconnect else {})
    if not stream:
        r = await client.post('/v1/generate', json=body)
        assert r.status_code == 200, r.text
        return r.json()['texts']
    async with client.stream('POST', '/v1/generate', json={**body, 'stream': True}) as r:
        assert r.status_code == 200
        text, n = '', 0
        async for chunk in r.aiter_text():
            text += chunk; n += 1
            if disconnect and text.count('\n\n') >= 2: return None     # leaves the block: the connection closes
    events = parse_events(text)
    assert events[-1][0] == 'done'
    return events[-1][1]['texts']


async def many_clients(url:str, n:int, n_leaving:int=0) -> list:
    "`n` clients at once, alternately plain and streaming, and `n_leaving` more that hang up mid-stream."
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=n + n_leaving + 8)) as client:
        return await asyncio.gather(*(one_client(client, i, stream=i % 2 == 1) for i in range(n)),
                                    *(one_client(client, 1000 + i, stream=True, disconnect=True) for i in range(n_leaving)))


def test_64_concurrent_clients(server):
    "64 clients at once, half of them streaming, and 4 more hanging up mid-stream: every request succeeds, seeded texts equal their one-at-a-time texts, no row leaks."
    cancelled = health(server)['requests_by_finish_reason']['cancelled']
    start = time.monotonic()
    results = asyncio.run(many_clients(server.url, 64, n_leaving=4))
    elapsed = time.monotonic() - start
    together, left = results[:64], results[64:]
    alone = [post(server, **client_body(i)).json()['texts'] for i in range(64)]
    assert together == alone and left == [None] * 4
    h = wait_until_idle(server)
    assert (h['rows_in_use'], h['requests_running'], h['requests_waiting']) == (0, 0, 0)
    assert h['requests_by_finish_reason']['cancelled'] == cancelled + 4
    assert elapsed < 60


def test_disconnect_frees_rows(server):
    "Clients that go away (streaming or not) free their rows at once, long before their 5,000 characters."
    cancelled = health(server)['requests_by_finish_reason']['cancelled']
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(3):
            with client.stream('POST', '/v1/generate', json={'prompt': 'KING', 'max_new_tokens': 5000, 'num_samples': 4, 'stream': True}) as r:
                next(r.iter_text())
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f'{server.url}/v1/generate', json={'prompt': 'KING', 'max_new_tokens': 5000, 'num_samples': 16}, timeout=0.3)
    h = wait_until_idle(server, timeout=5)
    assert (h['rows_in_use'], h['requests_running']) == (0, 0)
    assert h['requests_by_finish_reason']['cancelled'] == cancelled + 4


@pytest.fixture(scope='module')
def fuzz_server(served_run):
    "A server with small limits, so that every request the fuzzer makes is quick."
    s = serve(served_run, max_slots=4, max_prompt_chars=64, max_new_tokens_cap=20)
    yield s
    s.stop()


def test_fuzz_openapi_schema(fuzz_server):
    "schemathesis generates requests from the OpenAPI schema, valid and invalid: no 5xx, and the server stays up."
    st = shutil.which('st', path=str(Path(sys.executable).parent)) or shutil.which('st')
    if st is None: pytest.fail("this test needs schemathesis (its `st` command), a dev requirement of craft: pip install -e '.[dev]'", pytrace=False)
    r = subprocess.run([st, 'run', f'{fuzz_server.url}/openapi.json', '--checks', 'not_a_server_error', '--max-examples', '30',
                        '--max-time', '20', '--request-timeout', '10', '--seed', '1', '--workers', '2', '--no-color'],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    assert re.search(r'\d+ generated, \d+ passed', r.stdout), r.stdout[-5000:]
    print(r.stdout[r.stdout.find('WARNINGS'):] if 'WARNINGS' in r.stdout else '')
    assert health(fuzz_server)['requests_served'] > 0
    assert 'Traceback' not in fuzz_server.log, fuzz_server.log


def test_cli_serve(served_run, tmp_path):
    "`craft serve RUN --port 0` serves; a bad run directory is one line on stderr."
    help = subprocess.run([sys.executable, '-m', 'craft.cli', 'serve', '--help'], capture_output=True, text=True, timeout=60, env=ENV)
    assert help.returncode == 0 and '--max-slots' in help.stdout, help.stderr
    s = Server([sys.executable, '-m', 'craft.cli', 'serve', str(served_run), '--port', '0', '--device', 'cpu'])
    try:
        assert s.url.startswith('http://127.0.0.1:')
        assert health(s)['status'] == 'ok'
    finally: s.stop()
    bad = subprocess.run([sys.executable, '-m', 'craft.cli', 'serve', str(tmp_path / 'nowhere'), '--port', '0'], capture_output=True, text=True, timeout=60, env=ENV)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and 'no such file or directory' in bad.stderr


def test_cli_serve_refuses_more_slots_than_memory(served_run):
    "`craft serve --max-slots 100000000` is refused before anything is allocated: one line naming the memory asked for, the memory here, and the flag."
    r = subprocess.run([sys.executable, '-m', 'craft.cli', 'serve', str(served_run), '--port', '0', '--device', 'cpu', '--max-slots', '100000000'],
                       capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search(r'max_slots=100,000,000 needs [\d,.]+ [GT]B for the KV cache, more than the [\d,.]+ GB of memory free on cpu \(of [\d,.]+ GB\); '
                     r'lower --max-slots', r.stderr), r.stderr


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_shutdown_with_requests_in_flight(served_run, sig):
    "On SIGINT or SIGTERM, plain requests in flight get a JSON 503, streams an `error` event; the server stops at once, without a traceback."
    s = Server([sys.executable, '-m', 'craft.cli', 'serve', str(served_run), '--port', '0', '--device', 'cpu', '--max-slots', '4',
                '--max-new-tokens-cap', '100000', '--log-level', 'warning'])
    results = {}
    def plain(i):
        r = httpx.post(f'{s.url}/v1/generate', json={'prompt': 'KING', 'max_new_tokens': 100_000, 'seed': i}, timeout=30)
        results[i] = (r.status_code, r.headers['content-type'], r.json())
    def streamed(i):
        with httpx.stream('POST', f'{s.url}/v1/generate', json={'prompt': 'KING', 'max_new_tokens': 100_000, 'stream': True}, timeout=30) as r:
            results[i] = parse_events(r.read().decode())[-1]
    clients = [threading.Thread(target=f, args=(i,)) for i, f in enumerate([plain, plain, streamed, plain, plain, streamed])]  # 2 wait for rows
    for c in clients: c.start()
    deadline = time.monotonic() + 30
    while health(s)['requests_waiting'] < 2:
        assert time.monotonic() < deadline, health(s)
        time.sleep(0.05)
    start = time.monotonic()
    s.process.send_signal(sig)
    for c in clients: c.join(30)
    code = s.process.wait(30)
    assert time.monotonic() - start < 10
    for i in (0, 1, 3, 4):
        assert results[i][:2] == (503, 'application/json') and 'shutting down' in results[i][2]['error'], results[i]
    for i in (2, 5):
        assert results[i][0] == 'error' and 'shutting down' in results[i][1]['error'], results[i]
    assert code == (130 if sig == signal.SIGINT else -signal.SIGTERM), (code, s.log)
    assert 'Traceback' not in s.log and 'CancelledError' not in s.log and 'ERROR' not in s.log, s.log


def test_cli_serve_with_draft(served_run, model, tmp_path):
    "`craft serve RUN --draft RUN` (the model as its own draft): a request alone gets speculative rounds (greedy: `craft sample`'s text), several at once batched steps; a bad draft is one line."
    s = Server([sys.executable, '-m', 'craft.cli', 'serve', str(served_run), '--port', '0', '--device', 'cpu', '--dtype', 'float32',
                '--draft', str(served_run), '--draft-k', '3'])
    try:
        assert re.search(r'draft a model of [\d,]+ parameters \(k=3\) for a request alone', s.log), s.log
        greedy = dict(prompt='KING', max_new_tokens=80, temperature=0)
        expected = generate(*model, 'KING', max_new_tokens=80, temperature=0)
        assert post(s, **greedy).json()['texts'] == expected
        info = health(s)
        assert info['draft'].startswith('a model of') and 0 < info['draft_guesses_kept'] <= info['draft_guesses'], info
        answers = asyncio.run(_together(s.url, [greedy] * 4))                        # together: batched steps, then alone
        assert [a['texts'] for a in answers] == [expected] * 4
        sampled = post(s, prompt='KING', max_new_tokens=60, seed=1, stop=['I']).json()
        assert sampled['finish_reason'] in ('stop', 'length') and 'I' not in sampled['texts'][0], sampled
        assert sampled['finish_reason'] == 'stop' or sampled['generated_tokens'] == 60, sampled
    finally: s.stop()
    assert 'Traceback' not in s.log, s.log
    for draft, message in (('ngram:x', 'ngram:N'), (str(tmp_path / 'nowhere'), 'draft: ')):
        bad = subprocess.run([sys.executable, '-m', 'craft.cli', 'serve', str(served_run), '--port', '0', '--draft', draft],
                             capture_output=True, text=True, timeout=60, env=ENV)
        assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and message in bad.stderr, bad.stderr


async def _together(url:str, bodies:list[dict]) -> list[dict]:
    "POST every body at once; their JSON answers."
    async with httpx.AsyncClient(timeout=60) as client:
        return [r.json() for r in await asyncio.gather(*(client.post(f'{url}/v1/generate', json=b) for b in bodies))]
