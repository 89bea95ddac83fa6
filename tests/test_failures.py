"""A hostile user and a hostile machine: bad settings, moved corpora, full disks, read-only folders, closed streams, no memory.
Each is one line on stderr, a non-zero exit, and a run directory left as it was."""
import errno, json, os, re, shutil, subprocess, sys
from pathlib import Path
import pytest
import torch
from conftest import TINY, assert_one_line_error, craft, metrics, snapshot   # fixtures: env, tiny_run, tiny_run_copy

SHORT = [*TINY, '--threads', 1, '--max-iters', 4, '--eval-interval', 2, '--eval-iters', 1, '--sample-chars', 0]


def without_profile(result):
    "`result` without the machine profile's line (`craft sample: sampling 2x32, batch 1: ...`), which comes before any output."
    lines = [line for line in result.stderr.splitlines() if not re.match(r'craft \w+: (sampling|training) ', line)]
    stderr = ''.join(f"{line}\n" for line in lines)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout, stderr)


def obeying_permissions(cmd: list) -> list:
    "`cmd` run so that file permissions apply to it: as it is for a user; for root, without the capabilities that bypass them."
    if not hasattr(os, 'geteuid') or os.geteuid() != 0: return cmd
    setpriv = shutil.which('setpriv')
    if setpriv is None:
        pytest.fail("running as root, these tests need setpriv (util-linux) to drop the capabilities that bypass permissions")
    drop = '-dac_override,-dac_read_search'
    return [setpriv, '--bounding-set', drop, '--inh-caps', drop, *cmd]


def craft_restricted(env, *args):
    "`craft args` for which file permissions hold, even when the tests run as root."
    return subprocess.run(obeying_permissions([sys.executable, '-m', 'craft.cli', *map(str, args)]), env=env,
                          capture_output=True, text=True, timeout=180)


def craft_with_fault(env, fault: str, *args):
    "`craft args` with `fault` (Python run first, e.g. a patch that makes the disk full) injected into the process."
    code = f"import sys\n{fault}\nfrom craft.cli import main\nsys.exit(main())"
    command = [sys.executable, '-c', code, *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)


def disk_full(name: str = '', after: int = 0) -> str:
    "A fault: syncing a new file whose name contains `name` fails with ENOSPC, after `after` such files went through."
    return f"""
import errno, os, craft.files
_sync, seen = craft.files._sync, [0]
def full(path):
    if {name!r} in os.path.basename(path):
        seen[0] += 1
        if seen[0] > {after}: raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _sync(path)
craft.files._sync = full"""


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> Path:
    "A small corpus of 20,000 characters of Shakespeare, in a folder of its own."
    from craft.tokenizer import load_text, shakespeare_path
    path = tmp_path_factory.mktemp('data') / 'small.txt'
    path.write_text(load_text(shakespeare_path())[:20_000])
    return path


# --- the corpus of a resumed run ---

def test_resume_reads_the_recorded_corpus_from_anywhere_and_refuses_a_changed_one(env, tmp_path, corpus):
    data = tmp_path / 'data'; data.mkdir()
    shutil.copy(corpus, data / 'small.txt')
    command = [sys.executable, '-m', 'craft.cli', 'train', *map(str, SHORT), '--data', 'small.txt', '--out', '../run']
    result = subprocess.run(command, cwd=data, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    run = tmp_path / 'run'
    recorded = json.loads((run / 'config.json').read_text())['corpus']
    assert recorded['path'] == str((data / 'small.txt').resolve()) and not recorded['bundled']
    assert len(recorded['fingerprint']) == 24
    elsewhere = tmp_path / 'elsewhere'; elsewhere.mkdir()
    command = [sys.executable, '-m', 'craft.cli', 'train', '--resume', str(run), '--max-iters', '6', '--no-progress']
    resumed = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / 'status.json').read_text())['step'] == 6
    before = snapshot(run)
    (elsewhere / 'small.txt').write_text('another text with the same name')          # a trap in the new current folder
    with open(data / 'small.txt', 'a') as f: f.write('\nMore text.')
    assert_one_line_error(craft(env, 'train', '--resume', run, '--max-iters', 8), f"its corpus {data / 'small.txt'} has changed",
                          'restore it, or continue on other text with --data FILE')
    (data / 'small.txt').rename(data / 'moved.txt')
    assert_one_line_error(craft(env, 'train', '--resume', run, '--max-iters', 8), 'is missing', '--data FILE')
    (data / 'odd.txt').write_text('Señor ' * 2000)
    assert_one_line_error(craft(env, 'train', '--resume', run, '--max-iters', 8, '--data', data / 'odd.txt'),
                          "not in the tokenizer's vocabulary", "continue on text made of the run's characters")
    assert snapshot(run) == before
    result = craft(env, 'train', '--resume', run, '--max-iters', 8, '--data', data / 'moved.txt', '--no-progress')
    assert result.returncode == 0, result.stderr                      # --data: go on with other text, and record it
    assert json.loads((run / 'config.json').read_text())['corpus']['path'] == str((data / 'moved.txt').resolve())


def test_config_with_resume_is_refused(env, tiny_run_copy, tmp_path):
    (tmp_path / 'c.yaml').write_text('lr: 0.5\n')
    before = snapshot(tiny_run_copy)
    assert_one_line_error(craft(env, 'train', '--resume', tiny_run_copy, '--config', tmp_path / 'c.yaml', '--max-iters', 40),
                          'cannot change a resumed run', 'drop --config')
    assert snapshot(tiny_run_copy) == before


# --- everything is checked before the first step; a finished run stays finished ---

def test_a_corpus_without_a_newline_finishes_with_its_sample(env, tmp_path):
    (tmp_path / 'flat.txt').write_text('to be or not to be that is the question ' * 100)
    result = craft(env, 'train', *TINY, '--max-iters', 4, '--eval-interval', 2, '--data', tmp_path / 'flat.txt', '--sample-chars', 40,
                   '--out', tmp_path / 'run')
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / 'run' / 'sample.txt').read_text()) == 40 and 'a sample from' in result.stdout


@pytest.mark.parametrize('args, fragments', [
    (['--seed', -1], ['seed=-1 must be in [0, 2**63)']),
    (['--seed', 99999999999999999999999], ['seed=99999999999999999999999 must be a finite number below 2**63']),
    (['--weight-decay', 'nan'], ['weight_decay=nan must be a finite number']),
    (['--max-time', 'nan'], ['max_time=nan must be a finite number']),
    (['--lr', 'inf'], ['lr=inf must be a finite number']),
    (['--eval-iters', 1_000_000_000], ['--eval-iters 1000000000 draws', 'use --eval-iters 0']),
    (['--batch-size', 100_000_000], ['training at --batch-size 100000000 needs about', 'available', 'lower --batch-size']),
    (['--sample-chars', 10**15], ['--sample-chars 1000000000000000 needs about', 'lower --sample-chars']),
])
def test_settings_are_checked_before_the_first_step(env, tmp_path, args, fragments):
    assert_one_line_error(craft(env, 'train', *TINY, *args, '--out', tmp_path / 'run'), *fragments)
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('args, fragment', [
    (['--max-new-tokens', 10**20], '1 sample(s) of 100,000,000,000,000,000,000 characters needs about'),
    (['--num-samples', 10**7], '10,000,000 sample(s) of 500 characters needs about'),
])
def test_sampling_that_cannot_fit_is_refused(env, tiny_run, args, fragment):
    assert_one_line_error(craft(env, 'sample', tiny_run, *args), fragment, 'lower --num-samples or --max-new-tokens')


# --- file-system errors: one line, a non-zero exit, no temporary file, nothing else touched ---

def test_out_is_a_file_or_under_one(env, tmp_path):
    (tmp_path / 'file').write_text('x')
    assert_one_line_error(craft(env, 'train', *SHORT, '--out', tmp_path / 'file'), 'is a file, not a folder')
    assert_one_line_error(craft(env, 'train', *SHORT, '--out', tmp_path / 'file' / 'run'), 'Not a directory',
                          'a part of the path is a file')
    assert (tmp_path / 'file').read_text() == 'x'


def test_out_in_a_read_only_folder(env, tmp_path):
    (tmp_path / 'ro').mkdir(); (tmp_path / 'ro').chmod(0o555)
    assert_one_line_error(craft_restricted(env, 'train', *SHORT, '--out', tmp_path / 'ro' / 'run'), 'Permission denied')
    assert list((tmp_path / 'ro').iterdir()) == []


def test_unreadable_data(env, tmp_path, corpus):
    shutil.copy(corpus, tmp_path / 'secret.txt'); (tmp_path / 'secret.txt').chmod(0)
    assert_one_line_error(craft_restricted(env, 'train', *SHORT, '--data', tmp_path / 'secret.txt', '--out', tmp_path / 'run'),
                          'secret.txt', 'Permission denied')


@pytest.mark.parametrize('cache', ['read-only', 'under-a-file', 'full'])
def test_a_cache_that_cannot_be_written_costs_the_cache_not_the_run(env, tmp_path, corpus, cache):
    folder = tmp_path / 'cache'
    folder.mkdir(); (tmp_path / 'file').write_text('x')
    if cache == 'read-only': folder.chmod(0o555)
    if cache == 'under-a-file': folder = tmp_path / 'file' / 'cache'
    args = ['train', *SHORT, '--data', corpus, '--out', tmp_path / 'run']
    env = {**env, 'CRAFT_CACHE_DIR': str(folder)}
    result = craft_with_fault(env, disk_full('.tokens'), *args) if cache == 'full' else craft_restricted(env, *args)
    assert result.returncode == 0, result.stderr
    assert 'craft: warning: no token cache' in result.stderr and 'Traceback' not in result.stderr
    assert not list(tmp_path.rglob('*.tmp*'))


def test_a_full_disk_during_a_checkpoint(env, tmp_path):
    run = tmp_path / 'run'
    result = craft_with_fault(env, disk_full('state.pt', after=2), 'train', *TINY, '--max-iters', 20, '--eval-interval', 2,
                              '--eval-iters', 1, '--out', run)
    assert_one_line_error(result, f"{run / 'state.pt'}: No space left on device", 'its last checkpoint (step 2) is kept',
                          f'craft train --resume {run}')
    assert not list(run.glob('.*.tmp'))
    status = json.loads((run / 'status.json').read_text())
    assert status['status'] == 'failed' and 'No space left on device' in status['error']
    resumed = craft(env, 'train', '--resume', run, '--no-progress')
    assert resumed.returncode == 0, resumed.stderr
    assert [r['step'] for r in metrics(run) if 'val_loss' in r] == list(range(0, 21, 2))


def test_a_disk_too_full_for_the_status_still_records_the_failure(env, tmp_path):
    run = tmp_path / 'run'
    result = craft_with_fault(env, disk_full('', after=12), 'train', *TINY, '--max-iters', 20, '--eval-interval', 2, '--eval-iters', 1,
                              '--out', run)
    assert_one_line_error(result, 'No space left on device')
    assert json.loads((run / 'status.json').read_text())['status'] == 'failed'   # in place: no room for a temporary file
    assert not list(run.glob('.*.tmp'))


def test_resuming_a_read_only_run(env, tiny_run, tmp_path):
    run = tmp_path / 'run'
    shutil.copytree(tiny_run, run)
    before = snapshot(run)
    for path in (run, *run.iterdir()): path.chmod(0o555 if path.is_dir() else 0o444)
    assert_one_line_error(craft_restricted(env, 'train', '--resume', run, '--max-iters', 40), 'Permission denied')
    assert snapshot(run) == before


def test_compare_plot_to_a_read_only_folder(env, tiny_run, tmp_path):
    (tmp_path / 'ro').mkdir(); (tmp_path / 'ro').chmod(0o555)
    result = craft_restricted(env, 'runs', 'compare', tiny_run, tiny_run, '--plot', tmp_path / 'ro' / 'c.png')
    assert_one_line_error(result, 'Permission denied')
    assert list((tmp_path / 'ro').iterdir()) == []


def test_sample_to_a_full_or_closed_stdout(env, tiny_run):
    args = [sys.executable, '-m', 'craft.cli', 'sample', str(tiny_run), '--max-new-tokens', 20000, '--seed', 1]
    if Path('/dev/full').exists():
        with open('/dev/full', 'w') as full:
            result = subprocess.run(list(map(str, args)), env=env, stdout=full, stderr=subprocess.PIPE, text=True,
                                    timeout=180)
        assert_one_line_error(without_profile(result), 'No space left on device')
    closed = subprocess.run(list(map(str, args)), env=env, stderr=subprocess.PIPE, text=True, timeout=180,
                            preexec_fn=lambda: os.close(1))                  # stdout closed, as by `>&-`
    assert_one_line_error(without_profile(closed), 'standard output: Bad file descriptor')


def test_running_out_of_memory_during_training_is_one_line(env, tmp_path):
    fault = """
import craft.training
step = craft.training.Trainer.train_step
def train_step(self):
    if self.step == 3: raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                                          "you tried to allocate 123456789 bytes. Error code 12 (Cannot allocate memory)")
    return step(self)
craft.training.Trainer.train_step = train_step"""
    run = tmp_path / 'run'
    result = craft_with_fault(env, fault, 'train', *SHORT, '--max-iters', 10, '--out', run)
    assert_one_line_error(result, 'out of memory: an allocation of 117.7 MiB failed, with', 'available; lower --batch-size')
    assert json.loads((run / 'status.json').read_text())['status'] == 'failed'


# --- small things ---

@pytest.mark.parametrize('kind', ['device', 'fifo'])
def test_data_that_is_not_a_file(env, tmp_path, kind):
    if kind == 'fifo': os.mkfifo(tmp_path / 'pipe')
    data, what = (os.devnull, 'a character device') if kind == 'device' else (tmp_path / 'pipe', 'a named pipe (FIFO)')
    assert_one_line_error(craft(env, 'train', *SHORT, '--data', data, '--out', tmp_path / 'run'), f'is {what}, not a text file')


def test_config_that_is_a_folder(env, tmp_path):
    assert_one_line_error(craft(env, 'train', *SHORT, '--config', tmp_path), 'is a folder; pass a YAML or JSON file')


def test_an_unreadable_checkpoint_is_not_missing(env, tiny_run, tmp_path):
    shutil.copy(tiny_run / 'best.safetensors', tmp_path / 'model.safetensors')
    (tmp_path / 'model.safetensors').chmod(0)
    assert_one_line_error(craft_restricted(env, 'sample', tmp_path / 'model.safetensors'), 'Permission denied')


def test_a_flipped_bit_in_a_checkpoint_is_caught(env, tiny_run, tmp_path):
    data = bytearray((tiny_run / 'best.safetensors').read_bytes())
    data[-7] ^= 0x04
    (tmp_path / 'flipped.safetensors').write_bytes(bytes(data))
    assert_one_line_error(craft(env, 'sample', tmp_path / 'flipped.safetensors'), 'flipped.safetensors is damaged')


def test_damaged_weights_do_not_stop_a_resume(env, tiny_run, tmp_path):
    "state.pt holds the weights: a damaged latest.safetensors is rewritten by the resumed run."
    run = tmp_path / 'run'
    shutil.copytree(tiny_run, run)
    (run / 'latest.safetensors').write_bytes(b'\x00' * 64)
    result = craft(env, 'train', '--resume', run, '--max-iters', 32, '--no-progress', '--sample-chars', 0)
    assert result.returncode == 0, result.stderr
    from craft.rundir import load_checkpoint
    load_checkpoint(run / 'latest.safetensors')


def test_a_run_saved_before_state_held_the_weights_still_resumes(env, tiny_run, tmp_path):
    "Older runs kept the weights only in latest.safetensors: they resume when it is from state.pt's step, else one line."
    run = tmp_path / 'run'
    shutil.copytree(tiny_run, run)
    state = torch.load(run / 'state.pt', weights_only=True)
    torch.save({k: v for k, v in state.items() if k not in ('model', 'checksum')}, run / 'state.pt')
    (run / '.lock').unlink(missing_ok=True)
    result = craft(env, 'train', '--resume', run, '--max-iters', 32, '--no-progress', '--sample-chars', 0)
    assert result.returncode == 0, result.stderr
    state = torch.load(run / 'state.pt', weights_only=True)
    torch.save({**{k: v for k, v in state.items() if k not in ('model', 'checksum')}, 'step': 31}, run / 'state.pt')
    before = snapshot(run)
    assert_one_line_error(craft(env, 'train', '--resume', run, '--max-iters', 40), 'an older craft saved it',
                          'latest.safetensors and state.pt at different steps')
    assert snapshot(run) == before
