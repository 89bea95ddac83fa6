"Black-box tests of `craft train`: run directories, resume, DDP under torchrun, and every bad input."
import json, os, shutil, signal, subprocess, sys, time, zipfile
from pathlib import Path
import pytest
from conftest import TINY, assert_one_line_error, craft, metrics, snapshot   # fixtures: env, tiny_run, tiny_run_copy


def test_help_documents_every_flag_with_its_default(env):
    result = craft(env, 'train', '--help')
    assert result.returncode == 0
    text = ' '.join(result.stdout.split())
    for flag in ('--max-iters', '--batch-size', '--block-size', '--n-layer', '--n-head', '--n-embd', '--dropout', '--lr',
                 '--device', '--seed', '--compile', '--dtype', '--preset', '--config', '--resume', '--data', '--max-time',
                 '--val-fraction', '--grad-accum', '--out'):
        assert flag in text, flag
    assert text.count('(default:') >= 40


def test_a_run_writes_its_directory(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {'config.json', 'tokenizer.json', 'best.safetensors', 'latest.safetensors', 'state.pt', 'metrics.jsonl',
            'status.json', 'loss.png'} <= names
    status = json.loads((tiny_run / 'status.json').read_text())
    assert status['status'] == 'finished' and status['step'] == 30
    rows = metrics(tiny_run)
    assert [r['step'] for r in rows if 'val_loss' in r] == [0, 10, 20, 30]
    for key in ('train_loss', 'lr', 'tokens_per_sec', 'elapsed_s'): assert any(key in r for r in rows), key
    assert all('val_bpc' in r for r in rows if 'val_loss' in r)
    config = json.loads((tiny_run / 'config.json').read_text())
    assert config['format'] == 'craft.run' and config['model']['n_layer'] == 2 and config['train']['max_iters'] == 30


def test_checkpoints_round_trip_through_the_loader(tiny_run):
    import torch
    from craft.rundir import load_checkpoint
    from craft.tokenizer import CharTokenizer
    model, tokenizer, config = load_checkpoint(tiny_run)
    assert tokenizer == CharTokenizer.load(tiny_run / 'tokenizer.json')
    assert config.vocab_size == tokenizer.vocab_size == 65
    ids = torch.from_numpy(tokenizer.encode('ROMEO:')).long()[None]   # (1, T)
    latest, _, _ = load_checkpoint(tiny_run / 'latest.safetensors')
    assert torch.equal(model(ids)[0], load_checkpoint(tiny_run / 'best.safetensors')[0](ids)[0])
    assert latest(ids)[0].shape == (1, 6, 65)


@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_resume_continues_exactly(env, tmp_path, optimizer):
    "N steps, then N more after a resume, give the losses of 2N straight steps: weights, optimiser states (Muon's too), RNGs."
    common = [*TINY, '--optimizer', optimizer, '--lr-decay-iters', 30, '--eval-interval', 10, '--log-interval', 1, '--no-full-eval']
    assert craft(env, 'train', *common, '--max-iters', 30, '--out', tmp_path / 'straight').returncode == 0
    assert craft(env, 'train', *common, '--max-iters', 15, '--out', tmp_path / 'halves').returncode == 0
    result = craft(env, 'train', '--resume', tmp_path / 'halves', '--max-iters', 30, '--no-progress')
    assert result.returncode == 0, result.stderr
    losses = lambda d: [(r['step'], r['train_loss']) for r in metrics(d) if 'train_loss' in r]
    assert len(losses(tmp_path / 'straight')) == 30
    assert losses(tmp_path / 'halves') == losses(tmp_path / 'straight')


def test_resume_refuses_another_optimizer(env, tiny_run_copy):
    before = snapshot(tiny_run_copy)
    assert_one_line_error(craft(env, 'train', '--resume', tiny_run_copy, '--max-iters', 40, '--optimizer', 'muon'), 'cannot resume', 'adamw')
    assert snapshot(tiny_run_copy) == before


def test_a_target_loss_stops_the_run_at_the_first_evaluation_that_reaches_it(env, tmp_path):
    result = craft(env, 'train', *TINY, '--max-iters', 200, '--eval-interval', 5, '--eval-iters', 0, '--target-loss', 3.6,
                   '--out', tmp_path / 'run')
    assert result.returncode == 0, result.stderr
    status = json.loads((tmp_path / 'run' / 'status.json').read_text())
    evals = [r for r in metrics(tmp_path / 'run') if 'val_loss' in r]
    assert status['stop_reason'] == 'target_loss' and status['step'] < 200
    assert evals[-1]['val_loss'] <= 3.6 < min(r['val_loss'] for r in evals[:-1])
    assert status['step'] == evals[-1]['step'] and status['step'] % 5 == 0
    assert abs(status['target_reached_s'] - evals[-1]['elapsed_s']) < 0.5
    assert abs(status['full_val_loss'] - evals[-1]['val_loss']) < 1e-4   # eval_iters 0: every evaluation is the exact one
    assert 0 < status['startup_s'] < 60


@pytest.mark.parametrize('preset', ['speedrun', pytest.param('quality', marks=pytest.mark.slow)])   # quality: minutes a step here
def test_the_gpu_presets_also_run_on_a_cpu(env, tmp_path, preset):
    # dtype and threads fixed: timing the machine profile of these nanogpt-size Muon steps takes minutes on a 2-core EPYC
    result = craft(env, 'train', '--preset', preset, '--device', 'cpu', '--no-progress', '--max-iters', 2, '--batch-size', 2,
                   '--dtype', 'float32', '--threads', 1, '--eval-iters', 1, '--eval-interval', 2, '--no-full-eval',
                   '--sample-chars', 0, '--out', tmp_path / preset, timeout=300)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / preset / 'config.json').read_text())
    assert config['train']['optimizer'] == 'muon' and config['model']['pos_emb'] == 'rope' and config['model']['tie_weights'] is False
    assert json.loads((tmp_path / preset / 'status.json').read_text())['step'] == 2


def test_ddp_with_gloo_on_two_processes(env, tmp_path):
    torchrun = shutil.which('torchrun', path=str(Path(sys.executable).parent)) or shutil.which('torchrun')
    args = ['--max-iters', 8, '--eval-interval', 4, '--log-interval', 1, '--no-full-eval', '--lr-decay-iters', 8]
    ddp = subprocess.run([torchrun, '--standalone', '--nproc_per_node=2', '-m', 'craft.cli', 'train',
                          *map(str, [*TINY, *args, '--batch-size', 8, '--eval-iters', 8, '--out', tmp_path / 'ddp'])], env={**env, 'OMP_NUM_THREADS': '1'},
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # the same global batch in one process; the same 64 validation windows (8 x 8 and 4 x 16 from one generator)
    single = craft(env, 'train', *TINY, *args, '--batch-size', 16, '--eval-iters', 4, '--out', tmp_path / 'single')
    assert single.returncode == 0, single.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ddp', 'single']      # one run directory per run
    ddp_rows, single_rows = metrics(tmp_path / 'ddp'), metrics(tmp_path / 'single')
    assert [r['step'] for r in ddp_rows if 'health' in r] == [1, 4, 8]                     # health figures under DDP too
    assert json.loads((tmp_path / 'ddp' / 'provenance.json').read_text())['sessions'][0]['processes'] == 2
    assert [r['step'] for r in ddp_rows if 'train_loss' in r] == list(range(1, 9))   # rank 0 alone logs
    assert ddp_rows[0]['val_loss'] == pytest.approx(single_rows[0]['val_loss'], abs=1e-5)  # same initial model
    ddp_val = [r['val_loss'] for r in ddp_rows if 'val_loss' in r][-1]
    single_val = [r['val_loss'] for r in single_rows if 'val_loss' in r][-1]
    assert ddp_val == pytest.approx(single_val, abs=0.02)    # same global batch: the same progress
    assert ddp_val < ddp_rows[0]['val_loss'] - 0.1           # and it did learn
    resumed = subprocess.run([torchrun, '--standalone', '--nproc_per_node=2', '-m', 'craft.cli', 'train', '--resume',
                              str(tmp_path / 'ddp'), '--max-iters', '12', '--no-progress'], env={**env, 'OMP_NUM_THREADS': '1'},
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / 'ddp' / 'status.json').read_text())['step'] == 12


# Bad input: one clear line on stderr, a non-zero exit, and nothing lost.

@pytest.mark.parametrize('content, fragments', [
    (None, ['no such file or directory']),
    (b'', ['empty']),
    (b'\x00\x01\x02binary\x00', ['binary']),
    ('café'.encode('latin-1') * 100, ['UTF-8']),
    (b'too short', ['fewer than one window', '--block-size']),
])
def test_bad_corpus(env, tmp_path, content, fragments):
    data = tmp_path / 'corpus.txt'
    if content is not None: data.write_bytes(content)
    result = craft(env, 'train', *TINY, '--data', data, '--out', tmp_path / 'run')
    assert_one_line_error(result, *fragments)


@pytest.mark.parametrize('args, fragment', [
    (['--n-embd', 30, '--n-head', 4], 'n_embd=30 must be divisible by n_head=4'),
    (['--dropout', 1.5], 'dropout=1.5 must be in [0, 1)'),
    (['--lr', -1], 'lr=-1.0 must be > 0'),
    (['--preset', 'enormous'], "unknown preset 'enormous'"),
    (['--norm', 'batch'], "norm='batch' must be one of"),
    (['--bogus-flag'], 'unrecognized arguments: --bogus-flag'),
    (['--max-iters', 'many'], "invalid int value: 'many'"),
])
def test_bad_settings(env, tmp_path, args, fragment):
    assert_one_line_error(craft(env, 'train', '--device', 'cpu', *args, '--out', tmp_path / 'run'), fragment)
    assert not (tmp_path / 'run').exists()


def test_bad_config_file(env, tmp_path):
    (tmp_path / 'c.yaml').write_text('n_layers: 3\n')
    assert_one_line_error(craft(env, 'train', *TINY, '--config', tmp_path / 'c.yaml'), 'unknown setting(s): n_layers')


def test_a_new_run_never_mixes_into_an_old_one(env, tiny_run_copy, tmp_path):
    before = snapshot(tiny_run_copy)
    assert_one_line_error(craft(env, 'train', *TINY, '--out', tiny_run_copy), 'already holds a run', '--resume')
    assert_one_line_error(craft(env, 'train', '--resume', tiny_run_copy, '--preset', 'nanogpt'), 'drop --preset')
    assert_one_line_error(craft(env, 'train', '--resume', tiny_run_copy, '--max-iters', 30), 'already at step 30')
    assert snapshot(tiny_run_copy) == before
    # a run's own config.json reproduces it, in a new directory
    result = craft(env, 'train', '--config', tiny_run_copy / 'config.json', '--no-progress', '--out', tmp_path / 'again')
    assert result.returncode == 0, result.stderr
    assert metrics(tmp_path / 'again') == [dict(r, elapsed_s=r2['elapsed_s'], **({'tokens_per_sec': r2['tokens_per_sec']} if 'tokens_per_sec' in r else {}))
                                           for r, r2 in zip(metrics(tiny_run_copy), metrics(tmp_path / 'again'))]


def test_resume_from_something_that_is_not_a_run(env, tmp_path):
    assert_one_line_error(craft(env, 'train', '--resume', tmp_path / 'missing'), 'no such run directory')
    (tmp_path / 'empty').mkdir()
    assert_one_line_error(craft(env, 'train', '--resume', tmp_path / 'empty'), 'not a craft run directory')


def flip_a_bit_of_the_largest_record(path: Path):
    "Flip one bit in the middle of the largest tensor of a torch.save file (a zip whose records are stored, not compressed)."
    record = max(zipfile.ZipFile(path).infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    data[record.header_offset + 30 + len(record.filename.encode()) + len(record.extra) + record.file_size // 2] ^= 0x04
    path.write_bytes(bytes(data))


@pytest.mark.parametrize('damage, fragment', [
    ('truncate_state', 'state.pt is truncated or corrupted'),
    ('flipped_bit', 'state.pt is damaged (it does not match its checksum)'),
    ('not_a_dict', 'state.pt is not a craft training state (it holds a list, not a dict)'),
    ('wrong_type', "state.pt is not a craft training state (its 'step' is a str, not a int)"),
    ('wrong_optimizer', 'its state.pt does not fit this run'),
    ('truncate_weights', 'does not fit this run'),
    ('other_shape', 'cannot resume'),
])
def test_resume_failures_leave_the_run_intact(env, tiny_run, tmp_path, damage, fragment):
    import torch
    run = tmp_path / 'run'
    shutil.copytree(tiny_run, run)
    args, state = [], torch.load(run / 'state.pt', weights_only=True)
    unchecked = {k: v for k, v in state.items() if k != 'checksum'}   # damage that the checksum would not let through
    if damage == 'truncate_state': (run / 'state.pt').write_bytes((run / 'state.pt').read_bytes()[:500])
    if damage == 'flipped_bit': flip_a_bit_of_the_largest_record(run / 'state.pt')
    if damage == 'not_a_dict': torch.save([1, 2], run / 'state.pt')
    if damage == 'wrong_type': torch.save({**unchecked, 'step': 'ten'}, run / 'state.pt')
    if damage == 'wrong_optimizer':
        torch.save({**unchecked, 'optimizers': [{'state': {}, 'param_groups': [{'params': [0]}]}]}, run / 'state.pt')
    if damage == 'truncate_weights':   # state.pt holds the weights: one of another shape does not fit
        state['model']['head.weight'] = state['model']['head.weight'][:10]
        torch.save({**unchecked, 'model': state['model']}, run / 'state.pt')
    if damage == 'other_shape': args = ['--n-layer', 5]
    before = snapshot(run)
    assert_one_line_error(craft(env, 'train', '--resume', run, '--max-iters', 40, *args), fragment)
    assert snapshot(run) == before


def test_divergence_stops_and_keeps_the_last_good_checkpoint(env, tmp_path):
    run = tmp_path / 'run'
    result = craft(env, 'train', *TINY, '--lr', 1e4, '--grad-clip', 0, '--warmup-iters', 0, '--log-interval', 1,
                   '--max-iters', 200, '--eval-interval', 100, '--out', run)
    assert_one_line_error(result, 'training diverged', 'the last good checkpoint')
    assert json.loads((run / 'status.json').read_text())['status'] == 'failed'
    from craft.rundir import load_checkpoint
    import torch
    model, _, _ = load_checkpoint(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ctrl_c_saves_a_resumable_checkpoint(env, tmp_path):
    run = tmp_path / 'run'
    proc = subprocess.Popen([sys.executable, '-m', 'craft.cli', 'train', *map(str, [*TINY, '--max-iters', 100000, '--log-interval', 1,
                             '--eval-interval', 100000, '--out', run])], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any('train_loss' in r for r in (metrics(run) if (run / 'metrics.jsonl').exists() else [])):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert 'Traceback' not in stderr and 'resume with: craft train --resume' in stderr
    status = json.loads((run / 'status.json').read_text())
    assert status['status'] == 'interrupted' and status['step'] > 0
    result = craft(env, 'train', '--resume', run, '--max-iters', status['step'] + 5, '--no-progress')
    assert result.returncode == 0, result.stderr
    assert json.loads((run / 'status.json').read_text())['step'] == status['step'] + 5


def test_max_time_stops_the_run(env, tmp_path):
    result = craft(env, 'train', *TINY, '--max-iters', 10**6, '--max-time', 3, '--eval-interval', 10**6, '--out', tmp_path / 'run',
                   '--sample-chars', 20)
    assert result.returncode == 0, result.stderr
    status = json.loads((tmp_path / 'run' / 'status.json').read_text())
    assert status['status'] == 'finished' and status['stop_reason'] == 'max_time' and 0 < status['step'] < 10**6
    assert status['elapsed_s'] < 20
    assert len((tmp_path / 'run' / 'sample.txt').read_text()) == 20      # the end-of-run sample
    assert 'a sample from' in result.stdout


def test_a_folder_of_text_files_and_a_config_file(env, tmp_path):
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    (corpus / 'b.txt').write_text('the second file, ' * 300)
    (corpus / 'a.txt').write_text('the first file, ' * 300)
    (tmp_path / 'settings.json').write_text(json.dumps({'model': {'n_embd': 16}, 'train': {'max_iters': 5}}))
    result = craft(env, 'train', *TINY, '--data', corpus, '--config', tmp_path / 'settings.json', '--max-iters', 7,
                   '--out', tmp_path / 'run')
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert config['model']['n_embd'] == 16 and config['train']['max_iters'] == 7     # file over preset, flag over file
    from craft.tokenizer import CharTokenizer
    assert CharTokenizer.load(tmp_path / 'run' / 'tokenizer.json').chars == sorted(set('the first file, the second file, \n'))
