"Black-box tests of `craft runs`: run directories made by real short runs (finished, interrupted, damaged), via Python and the CLI."
import contextlib, io, json, math, os, shutil, signal, subprocess, sys, threading, time
from datetime import datetime
from pathlib import Path
import pytest
from craft.errors import CraftError
from craft.runs import (collect_runs, runs_table, sort_rows, show_runs, compare_runs, config_diff, runs_command,
                        compare_command, STALE_AFTER_S)
from craft.rundir import read_metrics, read_status
from craft.training import train

NAMES = ['base', 'broken', 'empty', 'fast', 'garbled', 'odd', 'stopped']
SHORT = dict(max_iters=20, eval_interval=10, eval_iters=2, log_interval=5, device='cpu', progress=False, full_eval=False,
             sample_chars=0)


def interrupted_run(out: Path) -> Path:
    "A real run stopped by SIGINT, as Ctrl-C stops it, once it has logged a training loss."
    def press_ctrl_c():
        deadline = time.time() + 60
        while time.time() < deadline:
            if any('train_loss' in r for r in read_metrics(out)): return os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    return train('tiny', out=out, **{**SHORT, 'max_iters': 100_000, 'max_time': 60.0, 'log_interval': 1, 'eval_interval': 100_000})


@pytest.fixture(scope='session')
def root(tmp_path_factory):
    "A folder of runs: two finished runs that differ in lr, an interrupted one, and four damaged ones."
    root = tmp_path_factory.mktemp('runs')
    train('tiny', out=root / 'base', **SHORT)
    train('tiny', out=root / 'fast', lr=1e-2, **SHORT)
    interrupted_run(root / 'stopped')
    shutil.copytree(root / 'fast', root / 'garbled')
    with open(root / 'garbled' / 'metrics.jsonl', 'a') as f: f.write('\x00garbage {{{\n[1, 2]\n{"step": 21, "train_l')
    (root / 'empty').mkdir()
    (root / 'broken').mkdir()
    (root / 'broken' / 'config.json').write_text('{"format": "craft.run", "mod')
    (root / 'odd').mkdir()   # valid JSON of the wrong shape, and a status that is not an object
    (root / 'odd' / 'config.json').write_text('["craft.run", 1]')
    (root / 'odd' / 'status.json').write_text('"finished"')
    (root / '.hidden').mkdir()
    (root / 'notes.txt').write_text('not a run')
    return root


def by_name(rows): return {r['name']: r for r in rows}


def stdout_of(f, *args, **kwargs) -> str:
    with contextlib.redirect_stdout(io.StringIO()) as out: f(*args, **kwargs)
    return out.getvalue()


def test_every_run_is_listed_with_its_status(root):
    rows = collect_runs(root)
    assert [r['name'] for r in rows] == NAMES
    assert {r['name']: r['status'] for r in rows} == {
        'base': 'finished', 'broken': 'damaged', 'empty': 'empty', 'fast': 'finished', 'garbled': 'finished',
        'odd': 'damaged', 'stopped': 'interrupted'}
    assert [r['name'] for r in rows if r['problem']] == ['broken', 'empty', 'garbled', 'odd']
    json.dumps(rows, allow_nan=False)   # rows are strict JSON


def test_a_finished_row_matches_its_files(root):
    row = by_name(collect_runs(root))['base']
    metrics = read_metrics(root / 'base')
    assert row['preset'] == 'tiny' and row['steps'] == 20 and row['config']['lr'] == 3e-3
    assert row['val_loss'] == pytest.approx(min(r['val_loss'] for r in metrics if 'val_loss' in r), abs=1e-5)
    assert row['val_bpc'] == pytest.approx(row['val_loss'] / math.log(2), abs=1e-5)
    speeds = sorted(r['tokens_per_sec'] for r in metrics if 'tokens_per_sec' in r)
    assert speeds[0] <= row['tokens_per_sec'] <= speeds[-1]
    assert row['elapsed_s'] == read_status(root / 'base')['elapsed_s'] > 0
    assert abs(datetime.fromisoformat(row['date']).timestamp() - time.time()) < 600


def test_an_interrupted_run(root):
    status = read_status(root / 'stopped')
    assert status['status'] == 'interrupted'   # written by the trainer itself on SIGINT
    row = by_name(collect_runs(root))['stopped']
    assert row['status'] == 'interrupted' and 0 < row['steps'] < 100_000 and row['problem'] is None
    assert row['val_loss'] is not None   # the step-0 evaluation


def test_damaged_runs_say_why(root):
    rows = by_name(collect_runs(root))
    assert rows['garbled']['problem'] == 'metrics.jsonl: 3 unreadable line(s) skipped'
    assert rows['garbled']['val_loss'] == rows['fast']['val_loss'] and rows['garbled']['steps'] == 20
    assert 'damaged run config' in rows['broken']['problem'] and rows['broken']['config'] == {}
    assert 'not a craft run config' in rows['odd']['problem'] and 'status.json is missing or unreadable' in rows['odd']['problem']
    assert rows['empty']['problem'].startswith('the folder is empty')


def test_the_table(root):
    text = runs_table(collect_runs(root))
    table, notes = text.split('\n\nnotes:\n')
    header, rule, *body = table.splitlines()
    fields = ['max_iters', 'max_time', 'lr', 'eval_interval', 'log_interval']   # what differs: stopped ran to be interrupted
    assert header.split() == ['name', 'date', 'preset', *fields, 'steps', 'val_loss', 'val_bpc', 'tok/s', 'time', 'status']
    assert [line.split()[0] for line in body] == NAMES
    assert body[NAMES.index('empty')].split() == ['empty'] + ['-'] * 12 + ['empty']
    assert body[NAMES.index('fast')].split()[4:9] == ['20', '0', '0.01', '10', '5']   # the date takes two words
    column = header.index('status')
    assert all(line[column:].split()[0] in ('finished', 'interrupted', 'damaged', 'empty') for line in body)
    assert [line.split(':')[0].strip() for line in notes.splitlines()] == ['broken', 'empty', 'garbled', 'odd']


def test_sort_by_any_column(root):
    rows = collect_runs(root)
    names = lambda sort: [r['name'] for r in sort_rows(rows, sort)]
    losses = [r['val_loss'] for r in sort_rows(rows, 'val_loss')]
    assert losses[:4] == sorted(losses[:4]) and losses[4:] == [None] * 3
    assert [r['val_loss'] for r in sort_rows(rows, '-val_loss')] == losses[:4][::-1] + [None] * 3
    assert names('-val_loss')[4:] == ['broken', 'empty', 'odd']
    assert names('lr')[-5:] == ['fast', 'garbled', 'broken', 'empty', 'odd']
    assert names('status')[0] == 'broken' and names('-name') == NAMES[::-1]
    assert sort_rows(rows, 'tok/s') == sort_rows(rows, 'tokens_per_sec')
    steps = [r['steps'] for r in sort_rows(rows, '-steps')]
    assert steps[:4] == sorted(steps[:4], reverse=True) and steps[4:] == [None] * 3
    with pytest.raises(CraftError, match="cannot sort by 'loss'"): sort_rows(rows, 'loss')


def test_runs_command(root, tmp_path):
    assert stdout_of(runs_command, str(root)) == runs_table(collect_runs(root)) + '\n'
    listed = json.loads(stdout_of(runs_command, str(root), sort='val_bpc', json=True))
    assert [r['name'] for r in listed][-3:] == ['broken', 'empty', 'odd']
    assert set(listed[0]) >= {'name', 'date', 'preset', 'steps', 'val_loss', 'val_bpc', 'tokens_per_sec', 'elapsed_s', 'status', 'config'}
    assert stdout_of(runs_command, str(tmp_path)) == f"no runs in {tmp_path}\n"
    assert stdout_of(runs_command, str(tmp_path), json=True) == '[]\n'
    assert stdout_of(runs_command, str(root / 'base')).splitlines()[2].split()[0] == 'base'   # one run directory
    with pytest.raises(CraftError, match='nowhere: no such directory'): runs_command(str(tmp_path / 'nowhere'))
    with pytest.raises(CraftError, match='is a file'): runs_command(str(root / 'notes.txt'))


def test_a_running_run_whose_lock_is_free_was_killed(root, tmp_path):
    run = Path(shutil.copytree(root / 'base', tmp_path / 'dead'))
    (run / 'status.json').write_text(json.dumps({**read_status(run), 'status': 'running'}))
    row = collect_runs(run)[0]
    assert row['status'] == 'killed' and f'craft train --resume {run}' in row['problem']


def test_a_silent_running_run_from_before_locks_is_stale(root, tmp_path):
    run = Path(shutil.copytree(root / 'base', tmp_path / 'alive'))
    (run / '.lock').unlink(missing_ok=True)                    # written by a craft without run locks
    status = {**read_status(run), 'status': 'running', 'updated': datetime.now().isoformat(timespec='seconds')}
    (run / 'status.json').write_text(json.dumps(status))
    assert collect_runs(run)[0]['status'] == 'running'
    old = time.time() - STALE_AFTER_S - 60
    (run / 'status.json').write_text(json.dumps({**status, 'updated': datetime.fromtimestamp(old).isoformat()}))
    for name in ('config.json', 'status.json', 'metrics.jsonl'): os.utime(run / name, (old, old))
    row = collect_runs(run)[0]
    assert row['status'] == 'stale' and 'has probably stopped' in row['problem']


def test_runs_in_subfolders_are_found(root, tmp_path):
    shutil.copytree(root / 'base', tmp_path / 'sweep' / 'lr-a')
    shutil.copytree(root / 'fast', tmp_path / 'sweep' / 'lr-b')
    shutil.copytree(root / 'base', tmp_path / 'single')
    assert [r['name'] for r in collect_runs(tmp_path)] == ['single', 'sweep/lr-a', 'sweep/lr-b']
    assert [r['name'] for r in collect_runs([tmp_path / 'sweep' / 'lr-b', root / 'base'])] == ['lr-b', 'base']
    assert 'lr-a' in repr(show_runs(tmp_path / 'sweep')) and '<table>' in show_runs(tmp_path)._repr_html_()


def test_compare_runs(root, tmp_path):
    diff, fig = compare_runs([root / 'base', root / 'fast', root / 'stopped'], plot=tmp_path / 'cmp.png')
    assert diff['lr'] == [3e-3, 1e-2, 3e-3]
    assert set(diff) == {'lr', 'max_iters', 'max_time', 'eval_interval', 'log_interval'}
    assert (tmp_path / 'cmp.png').read_bytes()[:4] == b'\x89PNG'
    by_step, by_time = fig.axes
    assert by_step.get_xlabel() == 'step' and by_time.get_xlabel().startswith('wall-clock')
    for ax in fig.axes:
        assert len(ax.lines) == 6   # train and validation for each run
        assert [line.get_color() for line in ax.lines] == ['C0', 'C0', 'C1', 'C1', 'C2', 'C2']
        assert [line.get_linestyle() for line in ax.lines[:2]] == ['--', '-'] and ax.lines[1].get_marker() == 'o'
        assert ax.lines[0].get_linewidth() < ax.lines[1].get_linewidth()
    val = [r for r in read_metrics(root / 'base') if 'val_loss' in r]
    assert list(by_step.lines[1].get_xdata()) == [r['step'] for r in val]
    assert list(by_time.lines[1].get_xdata()) == [r['elapsed_s'] for r in val]
    assert list(by_step.lines[1].get_ydata()) == [r['val_loss'] for r in val]


def test_compare_command(root, tmp_path):
    out = stdout_of(compare_command, [str(root / 'base'), str(root / 'fast')], plot=str(tmp_path / 'c.png'))
    lines = out.splitlines()
    assert lines[0].split() == ['base', 'fast'] and lines[1].split() == ['lr', '0.003', '0.01']
    rows = by_name(collect_runs(root))
    assert f"{rows['base']['val_loss']:.4f}" in out and f"{rows['fast']['val_bpc']:.4f}" in out
    assert lines[-1] == f"wrote {tmp_path / 'c.png'}" and (tmp_path / 'c.png').stat().st_size > 10_000
    assert 'wrote' not in stdout_of(compare_command, [str(root / 'base'), str(root / 'garbled')])


@pytest.mark.parametrize('runs, message', [
    (['base'], 'at least 2 run directories'),
    (['base', 'empty'], 'no config.json'),
    (['base', 'broken'], 'damaged run config'),
    (['base', 'odd'], 'not a craft run config'),
    (['base', 'nowhere'], 'no such run directory'),
])
def test_compare_refuses_what_is_not_two_runs(root, tmp_path, runs, message):
    with pytest.raises(CraftError, match=message):
        compare_command([str(root / r) for r in runs], plot=str(tmp_path / 'x.png'))
    assert not (tmp_path / 'x.png').exists()
    with pytest.raises(CraftError, match=message): config_diff([root / r for r in runs])


def test_compare_refuses_a_bad_plot_path(root, tmp_path):
    runs = [str(root / 'base'), str(root / 'fast')]
    with pytest.raises(CraftError, match="unknown image format '.txt'"): compare_command(runs, plot=str(tmp_path / 'a.txt'))
    with pytest.raises(CraftError, match='does not exist'): compare_command(runs, plot=str(tmp_path / 'no' / 'a.png'))


# The command line.

@pytest.fixture(scope='session')
def craft(tmp_path_factory):
    "Run `python -m craft.cli ARGS` in a subprocess, with a private token cache and no GPU."
    env = {**os.environ, 'CRAFT_CACHE_DIR': str(tmp_path_factory.mktemp('cli-cache')), 'CUDA_VISIBLE_DEVICES': '', 'MPLBACKEND': 'Agg'}
    def run(*args, cwd=None):
        return subprocess.run([sys.executable, '-m', 'craft.cli', *map(str, args)], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=120)
    return run


def assert_one_line_error(result, fragment):
    assert result.returncode == 1, result.stdout
    assert 'Traceback' not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert fragment in result.stderr, result.stderr


def test_cli_runs_prints_the_table(craft, root):
    result = craft('runs', root)
    assert result.returncode == 0, result.stderr
    assert result.stdout == runs_table(collect_runs(root)) + '\n'
    result = craft('runs', cwd=root.parent)   # the default folder: runs/ under the current directory
    assert_one_line_error(result, 'runs: no such directory')


def test_cli_runs_sorts_and_prints_json(craft, root):
    result = craft('runs', root, '--sort=-val_loss', '--json')
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r['name'] for r in rows] == [r['name'] for r in sort_rows(collect_runs(root), '-val_loss')]


def test_cli_compare(craft, root, tmp_path):
    result = craft('runs', 'compare', root / 'base', root / 'fast', '--plot', tmp_path / 'c.png')
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split() == ['lr', '0.003', '0.01']
    assert (tmp_path / 'c.png').read_bytes()[:4] == b'\x89PNG'
    assert_one_line_error(craft('runs', 'compare', root / 'base'), 'at least 2')
