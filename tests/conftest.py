"""Shared pytest fixtures and helpers: one torch thread, a private token cache, the environment of `craft` subprocesses, the
tiny run and the served run (each trained once per test run, and shared by pytest-xdist's workers), and the server helpers.
Test files import the helpers from here (`from conftest import craft`), never from one another."""
from __future__ import annotations
import hashlib, json, os, queue, re, shutil, subprocess, sys, threading
from pathlib import Path

import pytest
import torch
from filelock import FileLock   # a requirement of torch's

try: import httpx2 as httpx
except ImportError: httpx = None

TINY = ['--preset', 'tiny', '--device', 'cpu', '--no-progress']
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}   # tiny models: one thread is fastest, and robust to busy cores


@pytest.fixture(scope='session', autouse=True)
def one_thread():
    "One torch thread in the test process: the tiny models run fastest so, and do not stall when other processes share the cores."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session', autouse=True)
def token_cache(tmp_path_factory):
    "A token cache of the session's own (CRAFT_CACHE_DIR), so tests never touch the user's ~/.cache/craft."
    saved = os.environ.get('CRAFT_CACHE_DIR')
    os.environ['CRAFT_CACHE_DIR'] = str(tmp_path_factory.mktemp('token-cache'))
    yield os.environ['CRAFT_CACHE_DIR']
    if saved is None: os.environ.pop('CRAFT_CACHE_DIR', None)
    else: os.environ['CRAFT_CACHE_DIR'] = saved


def run_folder(tmp_path_factory) -> Path:
    "The temporary folder of this test run: under pytest-xdist the parent of the workers' own folders, which they share."
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


def built_once(tmp_path_factory, name:str, build) -> Path:
    """The folder `name` of this test run, made by `build(folder)` once: the first worker to ask builds it under a file lock,
    the others wait, then read it. A folder of this run only, so that nothing an older craft built is ever read."""
    shared = run_folder(tmp_path_factory)
    folder, built = shared / name, shared / f'{name}.built'
    with FileLock(shared / f'{name}.lock'):
        if not built.exists():
            shutil.rmtree(folder, ignore_errors=True)   # what a worker whose build failed left
            folder.mkdir()
            build(folder)
            built.touch()
    return folder


def craft_env(tmp_path_factory) -> dict:
    """Environment for the subprocesses: a token cache of this test run's own, which its workers share (so that a run and its
    reproduction see the same machine profile), no GPU, a non-interactive plot backend."""
    return {**os.environ, 'CRAFT_CACHE_DIR': str(run_folder(tmp_path_factory) / 'cache'), 'CUDA_VISIBLE_DEVICES': '',
            'MPLBACKEND': 'Agg', 'PYTHONUNBUFFERED': '1'}


@pytest.fixture(scope='session')
def env(tmp_path_factory): return craft_env(tmp_path_factory)


def craft(env, *args, timeout=180, **kw):
    return subprocess.run([sys.executable, '-m', 'craft.cli', *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def assert_one_line_error(result, *fragments):
    "A user error: non-zero exit, exactly one line on stderr, no traceback, and the line says what is wrong."
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert 'Traceback' not in result.stderr
    for fragment in fragments: assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(run_dir):
    "Hashes of every file of a run directory, to show that a failed command changed nothing."
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(run_dir).iterdir()) if p.is_file()}


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / 'metrics.jsonl').read_text().splitlines()]


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
    """The tiny run: `craft train --preset tiny --max-iters 30 --eval-interval 10`, trained once per test run for every test
    that needs a trained run. Read it only (a resume, even a refused one, locks it): a test that writes takes `tiny_run_copy`."""
    def build(folder):
        result = craft(craft_env(tmp_path_factory), 'train', *TINY, '--max-iters', 30, '--eval-interval', 10, '--out', folder / 'tiny')
        assert result.returncode == 0, result.stderr
    return built_once(tmp_path_factory, 'tiny-run', build) / 'tiny'


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path):
    "A copy of the tiny run of the test's own, to write into."
    return Path(shutil.copytree(tiny_run, tmp_path / 'tiny'))


@pytest.fixture(scope='session')
def served_run(tmp_path_factory):
    "A run directory with a tiny model trained for two seconds (so that samples look a little like text), for the server and page tests."
    from craft.training import train
    def build(folder):
        train('tiny', out=folder / 'tiny', max_iters=300, lr=1e-2, warmup_iters=20, progress=False, full_eval=False, eval_iters=5, sample_chars=0)
    return built_once(tmp_path_factory, 'served', build) / 'tiny'


@pytest.fixture(scope='session')
def model(served_run):
    "The served model, in float32 on the CPU as the servers run it."
    from craft.rundir import load_checkpoint
    return load_checkpoint(served_run, 'cpu')[:2]


class Server:
    "A server subprocess: its URL, and its stderr collected by a thread (so that the pipe never fills)."
    def __init__(self, command:list[str], timeout:float=60, env:dict|None=None):
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env or ENV)
        self.lines, self.url, found = [], None, queue.Queue()
        def read():
            for line in self.process.stderr:
                self.lines.append(line)
                if m := re.search(r'craft serve: (http://\S+)', line): found.put(m.group(1))
            found.put(None)
        threading.Thread(target=read, daemon=True).start()
        try: self.url = found.get(timeout=timeout)
        except queue.Empty: pass
        if self.url is None:
            self.stop()
            pytest.fail(f"the server did not start:\n{''.join(self.lines)}")

    def stop(self):
        self.process.terminate()
        try: self.process.wait(10)
        except subprocess.TimeoutExpired: self.process.kill(); self.process.wait(10)

    @property
    def log(self) -> str: return ''.join(self.lines)


def serve(served_run, **limits) -> Server:
    "`serve_command` in a subprocess, on a free port of 127.0.0.1 (the default host)."
    args = ', '.join(f"{k}={v!r}" for k, v in dict(port=0, device='cpu', dtype='float32', log_level='warning', **limits).items())
    return Server([sys.executable, '-c', f"from craft.server import serve_command; serve_command({str(served_run)!r}, {args})"])


def health(server) -> dict:
    r = httpx.get(f'{server.url}/health', timeout=10)
    assert r.status_code == 200
    return r.json()


def pytest_addoption(parser):
    parser.addoption('--slow', action='store_true', help='also run the slow versions of tests (marked slow)')
    parser.addoption('--site', action='store_true', help='run only the docs site tests (marked site): after nbdev_docs has built _docs/')


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: a longer version of a test, run with --slow')
    config.addinivalue_line('markers', 'site: reads the built docs site (_docs/) in a browser, run with --site after nbdev_docs')


def pytest_collection_modifyitems(config, items):
    """Without --slow, tests marked slow are deselected (not skipped): their quick versions run instead. The site
    tests need the site that nbdev_docs builds with Quarto: `pytest --site` runs them (CI does, after nbdev_docs)."""
    site = config.getoption('--site')
    marked = lambda item: item.get_closest_marker('site') is not None
    others = [item for item in items if marked(item) != site]
    if others:
        config.hook.pytest_deselected(items=others)
        items[:] = [item for item in items if marked(item) == site]
    if config.getoption('--slow'): return
    slow = [item for item in items if 'slow' in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if 'slow' not in item.keywords]
