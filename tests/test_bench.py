"`craft bench`: a quick CPU benchmark writes valid results, bad input fails early, the baseline is the same model as craft's, and the suites keep what they measured."
import json, math, os, signal, subprocess, sys, time

import pytest
import torch

from craft.baseline import BaselineGPT, baseline_from_craft
from craft.bench import bench_command
from craft.measure import load_results
from craft.errors import CraftError
from craft.model import GPT, GPTConfig


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    "The results of one `bench_command(quick=True)` on the CPU, with what it printed."
    out = tmp_path_factory.mktemp('bench') / 'sub' / 'bench.json'
    import contextlib, io
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        results = bench_command(device='cpu', quick=True, out=str(out))
    return out, results, stdout.getvalue(), stderr.getvalue()


def test_quick_bench_writes_results(quick):
    out, results, _, _ = quick
    assert out.is_file()
    assert load_results(out) == results == json.loads(out.read_text())
    assert set(results) >= {'format', 'version', 'machine', 'settings', 'ceilings', 'training', 'sampling', 'time_to_loss'}
    m = results['machine']
    assert m['device'] == 'cpu' and m['torch'] == torch.__version__ and m['date'] and m['device_name']
    assert results['ceilings']['matmul_tflops']['float32']['median'] > 0 and results['ceilings']['copy_gbs']['median'] > 0


def test_quick_bench_figures_and_ratios(quick):
    _, results, _, _ = quick
    [training] = results['training']
    assert training['preset'] == 'tiny'
    for name in ('craft', 'baseline'):
        stats = training[name]['tokens_per_s']
        assert stats['n'] == 2 and 0 < stats['min'] <= stats['median'] <= stats['max']
        peak = training[name]['peak_memory_bytes']
        if sys.platform.startswith('linux'):       # Linux resets the peak RSS: a real measurement of what training held
            assert training[name]['memory_peak_reset'] is True
            assert isinstance(peak, int) and 0 < peak < 2**30, peak       # something, and far less than a GiB for tiny
        else: assert peak is None or (isinstance(peak, int) and peak >= 0), peak   # elsewhere the OS may not tell
        assert training[name]['predicted_memory_bytes'] > 0
    ratio = training['ratio']['tokens_per_s']
    assert ratio == pytest.approx(training['craft']['tokens_per_s']['median'] / training['baseline']['tokens_per_s']['median'], rel=0.01)
    assert 0 < training['craft']['of_ceiling'] and training['floor']['tokens_per_s'] > 0
    assert [s['batch_size'] for s in results['sampling']] == [1, 4]
    for s in results['sampling']:
        assert set(s['ratio']) == {'cache_tokens_per_s', 'no_cache_tokens_per_s', 'first_token_s', 'per_token_s'}
        assert all(v > 0 for v in s['ratio'].values())
        assert s['craft_cache']['first_token_s']['median'] > 0
    [loss] = results['time_to_loss']
    assert loss['preset'] == 'tiny' and loss['target'] == 3.3
    for name in ('craft', 'baseline'):
        curve = loss[name]['curve']
        assert curve[0][1] == 0 and curve[0][2] == pytest.approx(math.log(65), abs=0.2)   # starts from a fresh model


def test_quick_bench_prints_summary(quick):
    _, _, stdout, stderr = quick
    assert 'craft/baseline' in stdout and 'tokens/s' in stdout
    assert stdout.startswith('craft bench on cpu')
    assert 'craft bench: wrote' in stderr                      # progress goes to stderr


@pytest.mark.parametrize('kwargs, message', [
    (dict(preset=['huge']), "unknown preset 'huge'"),
    (dict(device='tpu'), "unknown device 'tpu'"),
    (dict(repeats=0), '--repeats 0'),
    (dict(batch_size=[1, -2]), '--batch-size'),
    (dict(new_tokens=-1), '--new-tokens'),
    (dict(peak_tflops=0.0), '--peak-tflops'),
    (dict(loss_preset='giant'), "invalid --loss-preset 'giant'"),
    (dict(loss_preset='speedrun'), "invalid --loss-preset 'speedrun'"),
    (dict(preset=['speedrun']), 'preset speedrun uses parts the baseline does not implement'),
    (dict(loss_preset='cpu'), 'give --target-loss'),
])
def test_bad_input_fails_before_measuring(tmp_path, kwargs, message):
    with pytest.raises(CraftError, match=message.replace('(', r'\(')):
        bench_command(**{'device': 'cpu', 'out': str(tmp_path / 'b.json'), 'quiet': True, **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out(tmp_path):
    (tmp_path / 'file').write_text('')
    with pytest.raises(CraftError, match='cannot write --out'):
        bench_command(device='cpu', out=str(tmp_path / 'file' / 'b.json'), quiet=True)
    with pytest.raises(CraftError, match='is a directory'):
        bench_command(device='cpu', out=str(tmp_path), quiet=True)


def test_load_results_rejects_other_files(tmp_path):
    (tmp_path / 'run.json').write_text('{"format": "craft.run", "version": 1}')
    with pytest.raises(CraftError, match='not a craft bench results file'): load_results(tmp_path / 'run.json')
    (tmp_path / 'bad.json').write_text('{"format": "craft.bench", "vers')
    with pytest.raises(CraftError, match='not a readable JSON file'): load_results(tmp_path / 'bad.json')
    (tmp_path / 'v9.json').write_text('{"format": "craft.bench", "version": 9}')
    with pytest.raises(CraftError, match='version 9'): load_results(tmp_path / 'v9.json')


@pytest.mark.parametrize('preset', ['tiny', 'cpu', 'nanogpt'])
def test_baseline_is_the_same_model(preset):
    "Same parameter count, loss about ln(65) at init, and with craft's weights the same logits."
    torch.manual_seed(0)
    config = GPTConfig.from_preset(preset, n_layer=2, block_size=64, dropout=0.0)
    craft, fresh = GPT(config).eval(), BaselineGPT(config).eval()
    assert sum(p.numel() for p in fresh.parameters()) == craft.num_params(non_embedding=False)
    idx = torch.randint(0, 65, (2, 64))
    targets = torch.randint(0, 65, (2, 64))
    copied = baseline_from_craft(craft).eval()
    with torch.no_grad():
        craft_logits, craft_loss = craft(idx, targets)
        base_logits, base_loss = copied(idx, targets)
        fresh_loss = fresh(idx, targets)[1]
    assert fresh_loss.item() == pytest.approx(math.log(65), abs=0.25)   # near uniform guessing (wider models start a bit above)
    assert fresh_loss.item() == pytest.approx(craft_loss.item(), abs=0.15)
    assert torch.allclose(craft_logits, base_logits, atol=1e-4)
    assert base_loss.item() == pytest.approx(craft_loss.item(), abs=1e-5)


def test_baseline_generates_like_craft_greedy():
    "With craft's weights, the baseline's argmax next token is craft's: the whole-context recomputation gives the same logits as the cache."
    torch.manual_seed(1)
    config = GPTConfig.from_preset('tiny')
    craft = GPT(config).eval()
    copied = baseline_from_craft(craft).eval()
    idx = torch.randint(0, 65, (3, 5))
    with torch.no_grad():
        out = copied.generate(idx, 10, temperature=1e-6)          # (nearly) greedy
        caches = craft.new_caches(3)
        logits, _ = craft(out[:, :-1], caches=caches)             # one pass over the generated text
    assert out.shape == (3, 15)
    assert torch.equal(out[:, 5:], logits[:, 4:].argmax(-1))


def test_baseline_rejects_other_architectures():
    with pytest.raises(CraftError, match='nanoGPT architecture'):
        BaselineGPT(GPTConfig.from_preset('tiny', norm='rmsnorm'))


@pytest.fixture(scope='module')
def bench_cli():
    r = subprocess.run([sys.executable, '-m', 'craft.cli', 'bench', '--help'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_cli_help_lists_options(bench_cli):
    for flag in ('--device', '--preset', '--out', '--peak-tflops', '--repeats', '--batch-size', '--quick', '--threads'):
        assert flag in bench_cli


def test_cli_quick_bench(bench_cli, tmp_path):
    out = tmp_path / 'b.json'
    r = subprocess.run([sys.executable, '-m', 'craft.cli', 'bench', '--device', 'cpu', '--quick', '--threads', '1', '--out', str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert 'craft/baseline' in r.stdout
    assert load_results(out)['training'][0]['preset'] == 'tiny'


def test_cli_bad_preset(bench_cli, tmp_path):
    r = subprocess.run([sys.executable, '-m', 'craft.cli', 'bench', '--device', 'cpu', '--preset', 'huge', '--out', str(tmp_path / 'b.json')],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith('craft bench: error: unknown preset')
    assert not (tmp_path / 'b.json').exists()


# --- the suites: `craft bench --suite gpu|cpu --out DIR` -------------------------------------------------------

def craft_bench(*args, env=None, timeout=600):
    "Run `craft bench ARGS` in a fresh process (one torch thread); its CompletedProcess."
    env = {**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})}
    return subprocess.run([sys.executable, '-m', 'craft.cli', 'bench', *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_suite_help_documents_every_option():
    r = craft_bench('--suite', 'gpu', '--help', timeout=120)
    assert r.returncode == 0, r.stderr
    import inspect
    from craft.suite import bench_suite
    for name, p in inspect.signature(bench_suite).parameters.items():
        flag = '--' + name.replace('_', '-')
        assert flag in r.stdout, flag
    assert r.stdout.count('(default:') >= len(inspect.signature(bench_suite).parameters)   # each with its default
    assert 'craft bench --suite gpu --help' in craft_bench('--help', timeout=120).stdout  # craft bench's help points there


@pytest.mark.parametrize('args, message', [
    (['--suite', 'tpu'], "unknown --suite 'tpu'"),
    (['--suite', 'cpu', '--part', 'serving'], 'unknown --part serving for --suite cpu'),
    (['--suite', 'gpu', '--minutes', '0'], 'invalid --minutes 0'),
    (['--suite', 'gpu', '--device', 'tpu'], "unknown device 'tpu'"),
    (['--suite', 'gpu', '--preset', 'tiny'], 'unrecognized arguments: --preset tiny'),
])
def test_suite_bad_arguments_fail_before_measuring(tmp_path, args, message):
    r = craft_bench(*args, '--out', str(tmp_path / 'out'), timeout=120)
    assert r.returncode in (1, 2) and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1                      # one line, no traceback
    assert not (tmp_path / 'out').exists()


def test_suite_out_must_be_a_folder(tmp_path):
    (tmp_path / 'file.json').write_text('{}')
    r = craft_bench('--suite', 'gpu', '--device', 'cpu', '--quick', '--out', str(tmp_path / 'file.json'), timeout=120)
    assert r.returncode == 1 and 'is a file' in r.stderr
    assert (tmp_path / 'file.json').read_text() == '{}'


def test_suite_records_a_failed_part_and_goes_on(tmp_path):
    "The GPU machine lacks the web stack until its wheels are installed: without it, the serving part fails, the others run."
    broken = tmp_path / 'broken'
    (broken / 'fastapi').mkdir(parents=True)
    (broken / 'fastapi' / '__init__.py').write_text("raise ImportError('no fastapi on this machine')\n")
    path = os.pathsep.join([str(broken), os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep)
    out = tmp_path / 'out'
    r = craft_bench('--suite', 'gpu', '--device', 'cpu', '--quick', '--part', 'serving', '--part', 'training', '--out', str(out),
                    env={'PYTHONPATH': path})
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"craft bench: error: 1 of 2 parts failed (serving); each file in {out} says why"
    assert '[1/2] gpu suite, training: done' in r.stderr and '[2/2] gpu suite, serving: failed' in r.stderr   # a line per part
    training, serving = load_results(out / 'gpu-training.json'), load_results(out / 'gpu-serving.json')
    assert training['status'] == 'done' and training['training'][0]['craft']['tokens_per_s']['median'] > 0
    assert serving['status'] == 'failed' and 'no fastapi on this machine' in serving['error'], serving['error']
    assert serving['error'].startswith('CraftError: craft serve did not start')
    assert sorted(p.name for p in out.iterdir()) == ['gpu-serving.json', 'gpu-training.json']    # no temporary files left


def test_suite_cut_short_keeps_what_it_measured(tmp_path):
    "SIGTERM during the training runs: the training part's file stays whole, the runs' file says interrupted, exit 130."
    out = tmp_path / 'out'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    suite = subprocess.Popen([sys.executable, '-m', 'craft.cli', 'bench', '--suite', 'gpu', '--device', 'cpu', '--quick',
                              '--part', 'training', '--part', 'recipes', '--out', str(out)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in suite.stderr:                                        # wait until the first training run is under way
            if 'recipes: speedrun' in line: break
        time.sleep(1.0)
        suite.send_signal(signal.SIGTERM)
        rest = suite.stderr.read()
        assert suite.wait(60) == 130, rest
    finally:
        if suite.poll() is None: suite.kill()
    assert 'craft bench: interrupted' in rest
    assert load_results(out / 'gpu-training.json')['status'] == 'done'
    recipes = load_results(out / 'gpu-recipes.json')
    assert recipes['status'] == 'interrupted' and recipes['recipes'] == []   # cut during its first run
    assert sorted(p.name for p in out.iterdir()) == ['gpu-recipes.json', 'gpu-training.json']


def test_cpu_suite_quick(tmp_path):
    "nanoGPT's CPU recipe (shortened) against craft train's default, the recipe's budgets, sampling against the ceiling, int8/ONNX, fine-tuning, speculative decoding."
    out = tmp_path / 'out'
    r = craft_bench('--suite', 'cpu', '--device', 'cpu', '--quick', '--out', str(out))
    assert r.returncode == 0, r.stderr
    nano = load_results(out / 'cpu-nanogpt.json')
    assert nano['status'] == 'done' and nano['recipe']['batch_size'] == 12 and nano['recipe']['optimizer'] == 'adamw'
    assert nano['nanogpt']['steps'] == 20 and nano['nanogpt']['device'] == 'cpu'
    assert nano['craft']['stop_reason'] == 'max_time' and nano['craft']['max_time'] >= 1
    for run in (nano['nanogpt'], nano['craft']):
        assert 0 < run['full_val_loss'] < math.log(65) + 0.5 and 0 < run['startup_s'] < run['wall_s']
    assert nano['craft_minus_nanogpt']['full_val_loss'] == pytest.approx(nano['craft']['full_val_loss'] - nano['nanogpt']['full_val_loss'], abs=1e-3)
    sampled = load_results(out / 'cpu-sampling.json')
    assert [(s['preset'], s['batch_size']) for s in sampled['sampling']] == [('tiny', 1)]
    assert 0 < sampled['sampling'][0]['craft_cache']['of_ceiling']
    deployed = load_results(out / 'cpu-deploy.json')                  # int8 and ONNX Runtime (10_deploy)
    assert deployed['status'] == 'done' and deployed['onnx']['max_abs_error']['decode'] < 1e-4, deployed.get('error')
    data = load_results(out / 'cpu-data.json')                         # corpora from the bundled one up (03b_corpus)
    assert data['status'] == 'done', data.get('error')
    small, simulated = data['rows']['0.5 MB'], data['rows']['0.002 GB (simulated)']
    assert small['bytes'] >= 5 * 10**5 and simulated['bytes'] >= 2 * 10**6 and simulated['files'] > small['files']
    for row in (small, simulated):
        assert row['prepare']['returncode'] == 0 and row['warm']['returncode'] == 0 and row['warm']['full_val_tokens'] > 0
        assert 0 < row['warm']['to_step_1_s'] < row['warm']['wall_s'] and row['warm']['peak_rss_mb'] > 0
        assert row['vocab_size'] <= 128 and row['token_bytes'] == 1 and row['batch_us'] > 0      # ASCII files only
    assert 'cold' in small and 'cold' not in simulated and small['timed']['returncode'] == 0 and small['timed']['max_time'] == 2
    tuned = load_results(out / 'cpu-finetune.json')                   # fine-tuning on Austen (09_finetune)
    assert tuned['status'] == 'done', tuned.get('error')
    assert [r['name'] for r in tuned['runs']] == ['from scratch', 'full fine-tune', 'LoRA, rank 4', 'LoRA, rank 16']
    cli = sampled['cli']
    assert cli['new_tokens'] == 50 and cli['craft_sample']['tokens'] == 50 and cli['craft_sample']['device'] == 'cpu'
    assert cli['ratio'] == pytest.approx(cli['craft_sample']['tokens_per_s'] / cli['baseline_no_cache']['tokens_per_s'], rel=0.01)
    assert 0 < cli['craft_sample']['of_ceiling']
    long = load_results(out / 'cpu-long.json')                         # the recipe for each budget (11_suite)
    assert long['status'] == 'done', long.get('error')
    assert [r['budget'] for r in long['runs']] == [8.0] and long['runs'][0]['max_time'] >= 1 and long['runs'][0]['stop_reason'] in ('max_time', 'max_iters')
    assert long['met'] == (long['runs'][0]['full_val_loss'] <= long['target'])
    spec = load_results(out / 'cpu-speculative.json')                 # speculative decoding against ONNX Runtime (05b)
    assert spec['status'] == 'done', spec.get('error')
    assert sorted(spec['draft_tokens_per_s']) == ['1', '2'] and spec['onnx_tokens_per_s'] > 0
    assert all(0 <= a <= 1 for a in spec['acceptance'].values()) and spec['vs_onnx']['best_k'] in (1, 2)


def test_unknown_ladder_fails_before_measuring(tmp_path):
    r = craft_bench('--device', 'cpu', '--ladder', 'moon', '--out', str(tmp_path / 'l.json'), timeout=120)
    assert r.returncode == 1 and "unknown --ladder 'moon'" in r.stderr, r.stderr
    assert not (tmp_path / 'l.json').exists()
