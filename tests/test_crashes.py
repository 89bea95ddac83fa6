"Crashes, signals and second writers: `kill -9` at any moment, two processes on one run directory, Ctrl-C and SIGTERM."
import json, os, random, signal, subprocess, sys, time
from pathlib import Path
import pytest
from conftest import TINY, assert_one_line_error, craft, metrics   # fixtures: env (the session's environment)

# a checkpoint at every step, so that a kill lands in a checkpoint write as often as not
EVERY_STEP = [*TINY, '--threads', 1, '--eval-interval', 1, '--eval-iters', 1, '--log-interval', 1, '--sample-chars', 0,
              '--no-full-eval']


def start(env, *args) -> subprocess.Popen:
    "`craft <args>` in the background, its stderr captured."
    return subprocess.Popen([sys.executable, '-m', 'craft.cli', *map(str, args)], env={**env, 'OMP_NUM_THREADS': '1'},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout=180, proc=None):
    "Poll `condition` until it holds; fail if `proc` exits first or time runs out."
    deadline = time.time() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process exited with {proc.returncode}: {proc.stderr.read()}")
        if time.time() > deadline: pytest.fail('timed out')
        time.sleep(0.02)


def checkpoint_id(run: Path):
    "Changes whenever a new state.pt is committed (atomic replace: a new file)."
    try: st = (run / 'state.pt').stat()
    except FileNotFoundError: return None
    return st.st_ino, st.st_mtime_ns


def committed_step(run: Path) -> int:
    "The step of the run's last committed checkpoint (state.pt, loaded safely: it must be whole)."
    import torch
    return torch.load(run / 'state.pt', weights_only=True)['step']


def assert_steps_never_repeat(run: Path):
    "Each kind of metric appears at increasing steps, and the lines are in step order."
    rows = metrics(run)
    assert [r['step'] for r in rows] == sorted(r['step'] for r in rows)
    for key in ('train_loss', 'val_loss'):
        steps = [r['step'] for r in rows if key in r]
        assert steps == sorted(set(steps)), (key, steps)


def kill_loop(env, tmp_path, kills: int, seed: int):
    "Train, `kill -9` at a varied moment, resume; `kills` times. Every resume must work, and the metrics never repeat a step."
    rng, run = random.Random(seed), tmp_path / 'run'
    proc = start(env, 'train', *EVERY_STEP, '--max-iters', 100_000, '--out', run)
    wait_for(lambda: checkpoint_id(run) is not None, proc=proc)
    unresumable = 0
    for i in range(kills):
        if i % 5 == 4: time.sleep(rng.uniform(0, 1.5))           # now and then during start-up and restore
        else:                                                     # else once it trains: after a new checkpoint, a bit later
            seen = checkpoint_id(run)
            wait_for(lambda: checkpoint_id(run) != seen, proc=proc)
            time.sleep(rng.uniform(0, 0.3))
        if proc.poll() is not None: unresumable += 1              # it stopped by itself: the resume had failed
        proc.kill(); proc.wait()
        committed_step(run)                                       # the last committed checkpoint loads whole
        proc = start(env, 'train', '--resume', run, '--no-progress')
    proc.kill(); proc.wait()
    step = committed_step(run)
    done = craft(env, 'train', '--resume', run, '--no-progress', '--max-iters', step + 3, '--eval-interval', 1000)
    assert done.returncode == 0, done.stderr
    assert unresumable == 0
    assert_steps_never_repeat(run)
    assert json.loads((run / 'status.json').read_text())['status'] == 'finished'
    assert not list(run.glob('.*.tmp'))                           # what the kills left is gone
    return metrics(run)


def test_kill_9_at_any_moment_leaves_a_resumable_run(env, tmp_path):
    rows = kill_loop(env, tmp_path, kills=20, seed=0)
    assert max(r['step'] for r in rows) >= 10                     # it made progress between the kills


@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_a_resumable_run_slow(env, tmp_path):
    kill_loop(env, tmp_path, kills=60, seed=1)


def test_a_second_writer_is_refused_in_one_line(env, tmp_path):
    run = tmp_path / 'run'
    first = start(env, 'train', *EVERY_STEP, '--max-iters', 100_000, '--out', run)
    wait_for(lambda: checkpoint_id(run) is not None, proc=first)
    for args in (['--resume', run], [*TINY, '--out', run], ['--resume', run, '--max-iters', 10**6]):
        line = assert_one_line_error(craft(env, 'train', *args), f"{run} is being written by another process (pid {first.pid}")
        assert '`craft train ' in line and 'since 20' in line and f'kill {first.pid}' in line
    listed = json.loads(craft(env, 'runs', run, '--json').stdout)
    assert listed[0]['status'] == 'running'
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) == 130
    assert_steps_never_repeat(run)                                # no lines from a second process
    assert json.loads(craft(env, 'runs', run, '--json').stdout)[0]['status'] == 'interrupted'


def test_craft_runs_shows_a_killed_run_as_killed(env, tmp_path):
    run = tmp_path / 'run'
    proc = start(env, 'train', *EVERY_STEP, '--max-iters', 100_000, '--out', run)
    wait_for(lambda: checkpoint_id(run) is not None, proc=proc)
    proc.kill(); proc.wait()
    assert json.loads((run / 'status.json').read_text())['status'] == 'running'
    row = json.loads(craft(env, 'runs', run, '--json').stdout)[0]
    assert row['status'] == 'killed' and f'craft train --resume {run}' in row['problem']


@pytest.mark.parametrize('sig, code', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_run_and_exits_with_its_status(env, tmp_path, sig, code):
    run = tmp_path / 'run'
    proc = start(env, 'train', *TINY, '--max-iters', 100_000, '--log-interval', 1, '--eval-interval', 100_000, '--out', run)
    wait_for(lambda: (run / 'metrics.jsonl').exists() and any('train_loss' in r for r in metrics(run)), proc=proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == code
    stderr = proc.stderr.read()
    assert 'Traceback' not in stderr and f'interrupted ({sig.name})' in stderr
    status = json.loads((run / 'status.json').read_text())
    assert status['status'] == 'interrupted' and status['signal'] == sig.name
    assert craft(env, 'train', '--resume', run, '--no-progress', '--max-iters', status['step'] + 2).returncode == 0


@pytest.mark.parametrize('gap', [0.0, 0.05, 0.5])
def test_ctrl_c_held_down_never_prints_a_traceback(env, tmp_path, gap):
    "Ctrl-C, then more of them every `gap` seconds until the process is gone: one line, status 130, a resumable run."
    run = tmp_path / 'run'
    proc = start(env, 'train', *EVERY_STEP, '--max-iters', 100_000, '--out', run)
    wait_for(lambda: checkpoint_id(run) is not None, proc=proc)
    while proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        time.sleep(gap or 0.002)
    stderr = proc.stderr.read()
    assert proc.returncode == 130, stderr
    assert 'Traceback' not in stderr and 'Exception ignored' not in stderr, stderr
    assert json.loads((run / 'status.json').read_text())['status'] == 'interrupted'
    assert craft(env, 'train', '--resume', run, '--no-progress', '--max-iters', 10**6, '--max-time', 1).returncode == 0


@pytest.mark.parametrize('delay', [0.3, 0.6, 1.0])
def test_ctrl_c_during_start_up_is_one_line(env, delay):
    "While Python imports craft and PyTorch (seconds), Ctrl-C gives one line, not a traceback through the imports."
    proc = start(env, 'train', '--help')
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    stderr = proc.stderr.read()
    assert 'Traceback' not in stderr, stderr
    # 130 with one line; or done before the signal (0); or stopped by it while Python shuts down, when its handler is
    # already gone (-SIGINT, the shell's 130 too): never a traceback, never a half-written anything (it only printed help)
    outcomes = ((130, 'craft: interrupted\n'), (0, ''), (-signal.SIGINT, ''))
    assert (proc.returncode, stderr) in outcomes, (proc.returncode, stderr)
