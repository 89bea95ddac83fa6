"`craft bench`: a quick CPU benchmark writes valid results, bad input fails early, and the baseline is the same model as craft's."
import json, math, subprocess, sys

import pytest
import torch

from craft.bench import BaselineGPT, baseline_from_craft, bench_command, load_results
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
        assert training[name]['peak_memory_bytes'] is None or training[name]['peak_memory_bytes'] >= 0
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
    (dict(ladder='moon'), "unknown --ladder 'moon'"),
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
    if r.returncode != 0: pytest.skip('`craft bench` is not wired into craft.cli yet')
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
