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
