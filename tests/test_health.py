"Black-box tests of training health (issue 27): health figures, loss spikes and --on-spike, provenance, the test split, and `craft runs show|plot`."
import json, math, os, shutil, subprocess, sys
from pathlib import Path
import pytest
import torch
import craft.training as training_module   # the module whose learning_rate the spike tests patch
from craft.errors import CraftError
from craft.rundir import read_metrics, read_status, read_training_state
from craft.training import train

LAYERS = ['embedding', 'block0.attn', 'block0.mlp', 'block1.attn', 'block1.mlp', 'head']
SPIKY = dict(max_iters=60, eval_interval=10, eval_iters=2, log_interval=1, device='cpu', progress=False, full_eval=False, sample_chars=0)


@pytest.fixture(scope='module')
def craft(tmp_path_factory):
    "Run `python -m craft.cli ARGS` in a subprocess, with a private token cache and no GPU."
    env = {**os.environ, 'CRAFT_CACHE_DIR': str(tmp_path_factory.mktemp('cli-cache')), 'CUDA_VISIBLE_DEVICES': '', 'MPLBACKEND': 'Agg'}
    def run(*args, python=None):
        command = [sys.executable, '-c', python, *map(str, args)] if python else [sys.executable, '-m', 'craft.cli', *map(str, args)]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    return run


def assert_one_line_error(result, fragment):
    assert result.returncode == 1, result.stdout
    assert 'Traceback' not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert fragment in result.stderr, result.stderr


@pytest.fixture(scope='module')
def run_dir(craft, tmp_path_factory):
    "A run made by `craft train` with a test split."
    out = tmp_path_factory.mktemp('health') / 'run'
    result = craft('train', '--preset', 'tiny', '--max-iters', 30, '--eval-interval', 10, '--eval-iters', 2, '--test-fraction', 0.1,
                   '--sample-chars', 0, '--no-progress', '--device', 'cpu', '--out', out)
    assert result.returncode == 0, result.stderr
    return out


def test_health_figures_are_present_finite_and_shaped(run_dir):
    rows = read_metrics(run_dir)
    health = [r for r in rows if 'health' in r]
    assert [r['step'] for r in health] == [1, 10, 20, 30]
    for r in health:
        assert r['health']['layers'] == LAYERS
        for key in ('weight_norm', 'grad_norm', 'update_ratio', 'act_mean', 'act_std'):
            values = r['health'][key]
            assert len(values) == len(LAYERS) and all(math.isfinite(v) for v in values), (key, values)
        assert all(v > 0 for v in r['health']['update_ratio'])
    steps = [r for r in rows if 'train_loss' in r]
    assert steps and all(r['grad_norm'] > 0 and r['grad_norm_max'] >= r['grad_norm'] for r in steps)
    assert all(isinstance(r['clipped'], bool) and 0 <= r['clipped_steps'] <= 10 for r in steps)


def test_provenance_is_written_and_shown(craft, run_dir):
    sessions = json.loads((run_dir / 'provenance.json').read_text())['sessions']
    assert len(sessions) == 1
    s = sessions[0]
    assert s['torch'] == torch.__version__ and s['craft'] and s['python'] and s['numpy']
    assert s['machine']['cpu'] and s['machine']['cores'] >= 1 and s['processes'] == 1 and s['from_step'] == 0
    assert '--test-fraction 0.1' in s['command'] and s['corpus']['bundled']
    assert s['git'] is None or (len(s['git']['commit']) == 40 and isinstance(s['git']['dirty'], bool))
    shown = craft('runs', 'show', run_dir)
    assert shown.returncode == 0, shown.stderr
    for text in (f"torch     {s['torch']}", f"python    {s['python']}", f"cpu       {s['machine']['cpu']}", 'git       ',
                 'figure      test ', 'held-out test split', 'test_fraction=0.1'):
        assert text in shown.stdout, text
    as_json = json.loads(craft('runs', 'show', run_dir, '--json').stdout)
    assert as_json['provenance'] == sessions and as_json['status']['reported_split'] == 'test'


def test_compare_shows_where_provenance_differs(craft, run_dir, tmp_path):
    other = Path(shutil.copytree(run_dir, tmp_path / 'other'))
    record = json.loads((other / 'provenance.json').read_text())
    record['sessions'][0]['torch'] = '9.9.9'
    record['sessions'][0]['machine']['cpu'] = 'Some Other CPU'
    (other / 'provenance.json').write_text(json.dumps(record))
    result = craft('runs', 'compare', run_dir, other)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert lines['torch'].split()[1:] == [torch.__version__, '9.9.9']
    assert lines['cpu'].rstrip().endswith('Some Other CPU') and 'python' not in lines   # only what differs
    assert lines['test_bpc'].split()[1] == lines['test_bpc'].split()[2] != '-'


def test_runs_plot_draws_health_and_refuses_bad_input(craft, run_dir, tmp_path):
    result = craft('runs', 'plot', run_dir, '--health', '--out', tmp_path / 'health.png')
    assert result.returncode == 0, result.stderr
    assert (tmp_path / 'health.png').stat().st_size > 20_000
    assert_one_line_error(craft('runs', 'plot', tmp_path / 'nowhere', '--health'), 'not a run directory')
    (tmp_path / 'old').mkdir()
    (tmp_path / 'old' / 'metrics.jsonl').write_text('{"step": 1, "train_loss": 4.0}\n')
    assert_one_line_error(craft('runs', 'plot', tmp_path / 'old', '--health'), 'has no health figures')


def test_the_test_split_is_scored_once_at_the_end(run_dir):
    rows, status = read_metrics(run_dir), read_status(run_dir)
    scored = [i for i, r in enumerate(rows) if 'test_loss' in r]
    assert len(scored) == 1 and scored[0] > max(i for i, r in enumerate(rows) if 'val_loss' in r)   # after every evaluation
    assert status['reported_split'] == 'test' and status['test_loss'] == rows[scored[0]]['test_loss']


def test_test_tokens_stay_out_of_training(tmp_path):
    "The test split is text the model never trains on: a corpus of 'ab' repeated, then 'z' repeated (the last tenth)."
    corpus = tmp_path / 'corpus.txt'
    corpus.write_text('ab' * 4500 + 'z' * 1000)
    out = train('tiny', data=corpus, out=tmp_path / 'run', test_fraction=0.1, max_iters=100, lr=1e-2, eval_interval=50,
                eval_iters=0, device='cpu', progress=False, sample_chars=0)
    status = read_status(out)
    assert status['full_val_loss'] < 0.1            # 'ab' alternating: learned
    assert status['test_loss'] > 1.0                 # 'zzz': never seen, though trivial to learn had it been trained on


def test_bad_health_flags_are_one_line_errors(craft):
    assert_one_line_error(craft('train', '--preset', 'tiny', '--on-spike', 'ignore'), "on_spike='ignore' must be one of warn, skip, stop")
    assert_one_line_error(craft('train', '--preset', 'tiny', '--test-fraction', 0.95), 'leaves nothing to train on')


@pytest.fixture
def spike_at_step_40(monkeypatch):
    "The learning rate multiplied by 100 at step 40: the next step's loss spikes (logged as step 42)."
    schedule = training_module.learning_rate
    monkeypatch.setattr(training_module, 'learning_rate', lambda step, cfg, elapsed=0.0: schedule(step, cfg, elapsed) * (100 if step == 40 else 1))


def losses(run):
    return {r['step']: r['train_loss'] for r in read_metrics(run) if 'train_loss' in r}


def test_each_on_spike_choice_does_what_it_says(spike_at_step_40, tmp_path, capsys):
    warned = train('tiny', out=tmp_path / 'warn', on_spike='warn', **SPIKY)
    skipped = train('tiny', out=tmp_path / 'skip', on_spike='skip', **SPIKY)
    for run, action in ((warned, 'warn'), (skipped, 'skip')):
        spikes = [r for r in read_metrics(run) if r.get('event') == 'spike']
        assert [(s['step'], s['action']) for s in spikes] == [(42, action)]
        assert read_status(run)['status'] == 'finished' and read_status(run)['spikes'] == 1
    assert 'loss spike at step 42' in capsys.readouterr().err
    before = {s: l for s, l in losses(warned).items() if s <= 42}
    assert {s: l for s, l in losses(skipped).items() if s <= 42} == before        # the same run up to the spike...
    assert losses(skipped)[43] != losses(warned)[43]                               # ...then skip dropped the update
    with pytest.raises(CraftError, match=r"stopped \(--on-spike stop\); the last good checkpoint \(step 40\)"):
        train('tiny', out=tmp_path / 'stop', on_spike='stop', **SPIKY)
    status = read_status(tmp_path / 'stop')
    assert status['status'] == 'failed' and 'loss spike at step 42' in status['error']
    assert read_training_state(tmp_path / 'stop')['step'] == 40


def test_no_spike_without_one(tmp_path):
    run = train('tiny', out=tmp_path / 'calm', on_spike='stop', **SPIKY)
    assert read_status(run)['spikes'] == 0 and read_status(run)['status'] == 'finished'


def test_cli_on_spike_stop_is_one_line(craft, tmp_path):
    python = ("import sys, craft.training as t; s = t.learning_rate\n"
              "t.learning_rate = lambda step, cfg, e=0.0: s(step, cfg, e) * (100 if step == 40 else 1)\n"
              "from craft.cli import main; sys.exit(main(sys.argv[1:]))")
    result = craft('train', '--preset', 'tiny', '--on-spike', 'stop', '--max-iters', 60, '--eval-interval', 10, '--eval-iters', 2,
                   '--no-progress', '--device', 'cpu', '--out', tmp_path / 'run', python=python)
    assert_one_line_error(result, 'loss spike at step 42')
    assert f"the last good checkpoint (step 40) in {tmp_path / 'run'} is kept" in result.stderr
    assert f"craft train --resume {tmp_path / 'run'}" in result.stderr
