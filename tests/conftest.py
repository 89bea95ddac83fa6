"Shared pytest fixtures: one torch thread and a private token cache for the whole session."
import os, pytest, torch


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


@pytest.fixture(scope='session')
def served_run(tmp_path_factory):
    "A run directory with a tiny model trained for two seconds (so that samples look a little like text), for the server and page tests."
    from craft.training import train
    root = tmp_path_factory.mktemp('served')
    return train('tiny', out=root / 'tiny', max_iters=300, lr=1e-2, warmup_iters=20, progress=False, full_eval=False, eval_iters=5, sample_chars=0)


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
