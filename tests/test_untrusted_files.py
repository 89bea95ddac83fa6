"""Files craft does not control: an --out that names a device, a config or prompt that is /dev/zero or a pipe, run metadata
that is damaged or planted, a checkpoint header that claims a huge model, a full disk, a planted machine profile.
Each is one line on stderr, a non-zero exit, nothing of the user's lost and no temporary file left behind.
Nothing here touches the machine's own /dev: device nodes are made for the test in a temporary folder."""
import contextlib, json, os, signal, stat, subprocess, sys, time
from pathlib import Path
import pytest
from conftest import TINY, assert_one_line_error, craft, snapshot   # fixtures: env, tiny_run

MEMORY_CAP = 6 * 2**30   # bytes of address space for a command that must refuse before it allocates (prlimit --as)


def capped(env, *args, timeout=120):
    "`craft args` under an address-space cap: a regression that reads /dev/zero or builds a huge model fails, not the machine."
    def limit(): import resource; resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    return subprocess.run([sys.executable, '-m', 'craft.cli', *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit)


def special_file(folder: Path, name: str, major: int, minor: int) -> Path:
    "A character device (as root: `mknod`, e.g. 1 3 null, 1 5 zero) in `folder`; else a named pipe, which craft must refuse too."
    path = folder / name
    try: os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    except PermissionError: os.mkfifo(path)
    return path


def is_special(path: Path) -> bool:
    mode = os.lstat(path).st_mode
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def leftovers(folder: Path) -> list[str]:
    "Temporary files a writer left in `folder`."
    return sorted(p.name for p in folder.rglob('.*.tmp'))


def big_checkpoint(run: Path, out: Path, **config) -> Path:
    "A copy of `run`'s best checkpoint whose header says `config` (the tensors stay the tiny ones)."
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(run / 'best.safetensors'), 'pt') as f: header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    said = config.pop('raw', None)
    save_file(tensors, str(out), metadata={**header, **(said or {'config': json.dumps({**json.loads(header['config']), **config})})})
    return out


# --- 1. --out never replaces a device, and craft writes nothing in a system folder ---

def test_out_never_replaces_a_device_or_a_pipe(env, tiny_run, tmp_path):
    null = special_file(tmp_path, 'null.png', 1, 3)                         # .png: a name --plot would take
    pipe = tmp_path / 'pipe.png'; os.mkfifo(pipe)
    for target in (null, pipe):
        for args in (['bench', '--quick', '--device', 'cpu', '--out', target], ['export', tiny_run, '--out', target],
                     ['runs', 'compare', tiny_run, tiny_run, '--plot', target]):
            result = capped(env, *args)
            assert_one_line_error(result, str(target), 'not a file')
            assert is_special(target), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ['null.png', 'pipe.png']   # no onnx_sample.py, no temporary file


def test_out_in_a_system_folder_is_refused(env, tiny_run, tmp_path):
    "A link into /proc (where nothing could be written anyway, so a regression cannot harm the machine)."
    (tmp_path / 'kernel').symlink_to('/proc')
    assert_one_line_error(capped(env, 'export', tiny_run, '--out', tmp_path / 'kernel' / 'model.onnx'), 'system folder /proc')
    assert_one_line_error(capped(env, 'bench', '--quick', '--device', 'cpu', '--out', tmp_path / 'kernel' / 'b.json'), 'system folder /proc')
    assert_one_line_error(capped(env, 'train', *TINY, '--out', tmp_path / 'kernel' / 'run'), 'system folder /proc')
    assert_one_line_error(capped(env, 'export', tiny_run, '--out', tmp_path), 'is a directory', 'model.onnx')  # not bench.json


# --- 2. special files are refused without reading them ---

def test_special_files_are_refused_at_once(env, tiny_run, tmp_path):
    zero, pipe = special_file(tmp_path, 'zero', 1, 5), tmp_path / 'pipe'
    os.mkfifo(pipe)
    for source in (zero, pipe):
        start = time.monotonic()
        assert_one_line_error(capped(env, 'train', *TINY, '--config', source, '--out', tmp_path / 'run'), '--config', 'not a file')
        assert_one_line_error(capped(env, 'sample', tiny_run, '--prompt-file', source), '--prompt-file', 'not a file')
        assert time.monotonic() - start < 60                                  # refused, not read until memory runs out
    assert not (tmp_path / 'run').exists()


def test_run_metadata_linked_to_a_device_is_not_read(env, tiny_run, tmp_path):
    zero = special_file(tmp_path, 'zero', 1, 5)
    for name in ('status.json', 'config.json', 'metrics.jsonl'):
        run = tmp_path / name.replace('.', '_')
        run.mkdir()
        for f in ('config.json', 'status.json', 'metrics.jsonl', 'best.safetensors'):
            (run / f).symlink_to(zero) if f == name else (run / f).write_bytes((tiny_run / f).read_bytes())
        result = capped(env, 'runs', run, '--json')
        assert result.returncode == 0 and 'Traceback' not in result.stderr, result.stderr
        assert json.loads(result.stdout)[0]['name'] == run.name


# --- 3. the memory a checkpoint's model needs is checked before it is built ---

@pytest.mark.parametrize('command', [['serve', '--port', 0, '--device', 'cpu'], ['export', '--out', 'model.onnx'],
                                     ['sample', '--device', 'cpu']])
def test_a_huge_model_is_refused_before_it_is_built(env, tiny_run, tmp_path, command):
    big = big_checkpoint(tiny_run, tmp_path / 'big.safetensors', n_layer=64, n_embd=8192, n_head=64)
    name, *flags = command
    result = capped(env, name, big, *[tmp_path / f if f == 'model.onnx' else f for f in flags])
    assert_one_line_error(result, 'needs about', 'GiB of memory')
    assert not (tmp_path / 'model.onnx').exists() and not leftovers(tmp_path)


# --- 4. a full disk is one line, and the run stays resumable ---

@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    "A tmpfs of `size` mounted at `folder` (root); else a limit on file size (RLIMIT_FSIZE, EFBIG) of the same bytes."
    folder.mkdir()
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f"size={size}", 'tmpfs', str(folder)], capture_output=True).returncode == 0
    try: yield mounted
    finally:
        if mounted: subprocess.run(['umount', str(folder)], check=True)


def fsize_limit(size: str):
    n = int(size.rstrip('k')) * 1024
    def limit(): import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
    return limit


@pytest.mark.parametrize('size', ['120k', '250k', '330k', '450k'])
def test_a_full_disk_is_one_line_and_the_run_resumes(env, tmp_path, size):
    disk = tmp_path / 'disk'
    with small_disk(disk, size) as mounted:
        args = [sys.executable, '-m', 'craft.cli', 'train', *TINY, '--max-iters', 30, '--eval-interval', 5, '--eval-iters', 1,
                '--sample-chars', 0, '--threads', 1, '--out', disk / 'run']
        result = subprocess.run(list(map(str, args)), env=env, capture_output=True, text=True, timeout=180,
                                preexec_fn=None if mounted else fsize_limit(size))
        line = assert_one_line_error(result, 'resume with: craft train --resume')
        assert ('No space left on device' if mounted else 'too large') in line, line
        assert not leftovers(disk)
        status = json.loads((disk / 'run' / 'status.json').read_text())
        assert status['status'] == 'failed'
        saved = subprocess.run(['cp', '-a', str(disk / 'run'), str(tmp_path / 'run')]).returncode == 0
    assert saved
    if (tmp_path / 'run' / 'state.pt').exists():                             # a checkpoint was committed: it resumes
        resumed = craft(env, 'train', '--resume', tmp_path / 'run', '--no-progress', '--max-iters', 12, '--sample-chars', 0)
        assert resumed.returncode == 0, resumed.stderr


def test_a_full_cache_folder_is_a_warning(env, tmp_path):
    cache = tmp_path / 'cache'
    with small_disk(cache, '100k') as mounted:
        if mounted: (cache / 'filler').write_bytes(os.urandom(90_000))
        args = [sys.executable, '-m', 'craft.cli', 'train', *TINY, '--max-iters', 2, '--eval-interval', 2, '--eval-iters', 1,
                '--sample-chars', 0, '--out', tmp_path / 'run']
        result = subprocess.run(list(map(str, args)),
                                env={**env, 'CRAFT_CACHE_DIR': str(cache)}, capture_output=True, text=True, timeout=180,
                                preexec_fn=None if mounted else fsize_limit('80k'))
        assert result.returncode == 0, result.stderr
        assert 'no token cache' in result.stderr and 'Errno None' not in result.stderr and 'Traceback' not in result.stderr
        assert not leftovers(cache)


# --- 5. damaged run metadata is parsed defensively ---

def test_damaged_run_metadata(env, tiny_run, tmp_path):
    runs = tmp_path / 'runs'
    for name, damage in (('nested', {'status.json': '[' * 100_000}), ('digits', {'config.json': '{"format": ' + '9' * 5000 + '}'}),
                         ('lines', {'metrics.jsonl': '{"step": 1}\n' + '[' * 100_000 + '\n{"step": ' + '9' * 5000 + '}\n'})):
        run = runs / name
        run.mkdir(parents=True)
        for f in ('config.json', 'status.json', 'metrics.jsonl', 'best.safetensors'): (run / f).write_bytes((tiny_run / f).read_bytes())
        for f, text in damage.items(): (run / f).write_text(text)
    before = {name: snapshot(runs / name) for name in ('nested', 'digits', 'lines')}
    result = craft(env, 'runs', runs, '--json')
    assert result.returncode == 0 and 'Traceback' not in result.stderr, result.stderr
    rows = {r['name']: r for r in json.loads(result.stdout)}
    assert rows['nested']['status'] == 'unknown' and 'damaged' in rows['digits']['problem']
    assert 'metrics.jsonl: 2 unreadable line(s) skipped' in rows['lines']['problem']
    assert {name: snapshot(runs / name) for name in before} == before


def test_a_damaged_metrics_line_does_not_stop_the_server(tiny_run, tmp_path, capsys):
    from craft.serving import run_info
    run = tmp_path / 'run'; run.mkdir()
    for f in ('config.json', 'metrics.jsonl', 'best.safetensors'): (run / f).write_bytes((tiny_run / f).read_bytes())
    with open(run / 'metrics.jsonl', 'a') as f: f.write('[' * 100_000 + '\n{"step": 1, "val_loss": 9.5}\n')
    assert run_info(run)['val_loss'] == 9.5
    assert capsys.readouterr().err.strip() == f"craft: warning: {run / 'metrics.jsonl'}: skipped 1 damaged line(s)"


@pytest.mark.parametrize('header, said', [({'config': '[' * 100_000}, 'nested too deeply'),
                                          ({'config': '{"n_layer": ' + '9' * 5000 + '}'}, 'damaged craft header'),
                                          ({'metadata': '[1]'}, 'must be JSON objects'),
                                          ({'tokenizer': '{"format": 1}'}, 'not a craft tokenizer')])
def test_a_damaged_checkpoint_header_is_one_line_naming_the_file(env, tiny_run, tmp_path, header, said):
    bad = big_checkpoint(tiny_run, tmp_path / 'bad.safetensors', raw=header)
    assert_one_line_error(capped(env, 'sample', bad, '--device', 'cpu'), 'bad.safetensors', said)
    assert_one_line_error(capped(env, 'serve', bad, '--port', 0, '--device', 'cpu'), 'bad.safetensors', said)


# --- 6. a planted machine profile is measured again ---

@pytest.mark.parametrize('choice', [{'dtype': 'float32', 'threads': 4096}, {'dtype': 'float32', 'threads': -3},
                                    {'dtype': 'save', 'threads': 1}])
def test_a_planted_machine_profile_is_measured_again(env, tiny_run, tmp_path, choice):
    env = {**env, 'CRAFT_CACHE_DIR': str(tmp_path / 'cache')}
    for var in ('CRAFT_THREADS', 'OMP_NUM_THREADS', 'CRAFT_DTYPE'): env.pop(var, None)
    # float weights: with --quantize auto the int8 copy's profile is cached too, and read only where int8 wins
    sample = lambda: craft(env, 'sample', tiny_run, '--device', 'cpu', '--quantize', 'none', '--max-new-tokens', 5, '--seed', 0, timeout=120)
    assert sample().returncode == 0
    profiles = tmp_path / 'cache' / 'machine-profiles.json'
    planted = {k: {**v, 'choice': choice} for k, v in json.loads(profiles.read_text()).items()}
    profiles.write_text(json.dumps(planted))
    result = sample()
    assert result.returncode == 0 and 'Traceback' not in result.stderr, result.stderr
    assert 'measured' in result.stderr and '4096' not in result.stderr and 'save' not in result.stderr, result.stderr
    after = list(json.loads(profiles.read_text()).values())
    fresh = {(v['work'], v.get('load')) for v in after if v['choice'] != choice}
    stale = [(v['work'], v.get('load')) for v in after if v['choice'] == choice]
    # the cache is mended: a planted profile survives only where the machine's load changed between the runs
    # (other tests share the cores), so that the same work was measured again under the other load's key
    assert fresh and all(work in {w for w, _ in fresh} and (work, load) not in fresh for work, load in stale), after


# --- 7. the small ones ---

def test_peak_tflops_must_be_finite(env, tmp_path):
    assert_one_line_error(craft(env, 'bench', '--quick', '--device', 'cpu', '--peak-tflops', 'inf', '--out', tmp_path / 'b.json'),
                          '--peak-tflops inf')
    assert not (tmp_path / 'b.json').exists()


def test_sigterm_during_start_up_is_one_line(env):
    for delay in (0.3, 1.0):
        proc = subprocess.Popen([sys.executable, '-m', 'craft.cli', 'train', '--help'], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        stderr = proc.stderr.read()
        assert 'Traceback' not in stderr
        assert (proc.returncode, stderr) in ((143, 'craft: interrupted\n'), (0, ''), (-signal.SIGTERM, '')), (proc.returncode, stderr)


def test_ctrl_c_says_stopping_at_once(env, tmp_path):
    run = tmp_path / 'run'
    args = [sys.executable, '-m', 'craft.cli', 'train', *TINY, '--max-iters', 100_000, '--eval-interval', 100_000,
            '--log-interval', 1, '--out', run]
    proc = subprocess.Popen(list(map(str, args)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((run / 'metrics.jsonl').exists() and 'train_loss' in (run / 'metrics.jsonl').read_text()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    lines = proc.stderr.read().splitlines()
    stopping = next(i for i, line in enumerate(lines) if line.startswith('craft: stopping after step'))
    assert 'interrupted (SIGINT)' in lines[-1] and stopping < len(lines) - 1


def test_head_health(tiny_run):
    from fastapi.testclient import TestClient
    from craft.server import create_app
    with TestClient(create_app(tiny_run, device='cpu', dtype='float32', max_slots=2)) as client:
        assert client.head('/health').status_code == 200
        assert client.get('/health').json()['max_slots'] == 2


def test_example_program_refuses_bad_settings_and_planted_metadata(env, tiny_run, tmp_path):
    pytest.importorskip('onnxscript')
    onnx = pytest.importorskip('onnx')
    assert craft(env, 'export', tiny_run, '--out', tmp_path / 'model.onnx', timeout=300).returncode == 0
    script = tmp_path / 'onnx_sample.py'
    run = lambda *args: subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=60, env=env)
    assert_one_line_error(run(tmp_path / 'model.onnx', '--max-new-tokens', -3), 'onnx_sample: error', 'max_new_tokens=-3 must be >= 0')
    model = onnx.load(tmp_path / 'model.onnx')
    for p in model.metadata_props:
        if p.key == 'craft.config': p.value = json.dumps({k: v for k, v in json.loads(p.value).items() if k != 'block_size'})
    onnx.save(model, tmp_path / 'planted.onnx')
    assert_one_line_error(run(tmp_path / 'planted.onnx'), 'onnx_sample: error', 'planted.onnx: damaged craft metadata', 'block_size')
