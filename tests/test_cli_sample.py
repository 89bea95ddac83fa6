"`craft sample` through the command line, in subprocesses (`python -m craft.cli sample ...`)."
import json, os, re, subprocess, sys

import pytest

from conftest import TINY, built_once, craft, craft_env


@pytest.fixture(scope='module')
def run_dir(tiny_run):
    "The tiny run (the CLI only needs a valid checkpoint)."
    return tiny_run


@pytest.fixture(scope='module')
def draft_run(tmp_path_factory):
    "A draft for the tiny run: one layer of 16 channels on the same corpus, trained once per test run (a few seconds)."
    def build(folder):
        r = craft(craft_env(tmp_path_factory), 'train', *TINY, '--n-layer', 1, '--n-head', 2, '--n-embd', 16, '--max-iters', 20,
                  '--eval-interval', 10, '--out', folder / 'draft')
        assert r.returncode == 0, r.stderr
    return built_once(tmp_path_factory, 'draft-run', build) / 'draft'


def craft_sample(*args, env:dict|None=None):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})}   # a tiny model: one thread is fastest, and robust to busy cores
    return subprocess.run([sys.executable, '-m', 'craft.cli', 'sample', *map(str, args)], capture_output=True, text=True, timeout=120, env=env)


def assert_one_line_error(result):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert 'Traceback' not in result.stderr and 'error' in lines[0]


def test_sample_prints_text(run_dir):
    r = craft_sample(run_dir, '--prompt', 'KING', '--max-new-tokens', '40', '--seed', '1', '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.rstrip('\n')) >= 30 and 'tokens/s' in r.stderr


def test_sample_options(run_dir, tmp_path):
    (tmp_path / 'prompt.txt').write_text('ROMEO:\n', encoding='utf-8')
    r = craft_sample(run_dir, '--prompt-file', tmp_path / 'prompt.txt', '--max-new-tokens', '30', '--num-samples', '2',
                     '--temperature', '0', '--stop', 'zz', '--stop', 'qq', '--top-k', '5', '--no-cache', '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    assert '--- sample 1 ---' in r.stdout and '--- sample 2 ---' in r.stdout
    a = craft_sample(run_dir, '--prompt', 'KING', '--max-new-tokens', '30', '--seed', '4', '--device', 'cpu')
    b = craft_sample(run_dir, '--prompt', 'KING', '--max-new-tokens', '30', '--seed', '4', '--device', 'cpu')
    assert a.returncode == 0 and a.stdout == b.stdout


def test_compiled_decoding_gives_the_same_text(run_dir):
    "`--compile` runs the decode step through torch.compile; a seeded sample is unchanged."
    common = [run_dir, '--prompt', 'KING', '--max-new-tokens', '60', '--temperature', '1', '--seed', '3', '--device', 'cpu', '--dtype', 'float32']
    eager, compiled = craft_sample(*common), craft_sample(*common, '--compile')
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout and len(eager.stdout.strip()) > 40


def test_missing_run(tmp_path):
    assert_one_line_error(craft_sample(tmp_path / 'nope'))


def test_corrupted_checkpoint(tmp_path):
    (tmp_path / 'best.safetensors').write_bytes(b'this is not a safetensors file' * 100)
    assert_one_line_error(craft_sample(tmp_path))


@pytest.mark.parametrize('flags', [['--temperature', '-1'], ['--top-p', '2'], ['--num-samples', '0'],
                                   ['--prompt', 'café'], ['--dtype', 'int8']])
def test_bad_values(run_dir, flags):
    assert_one_line_error(craft_sample(run_dir, *flags))


def test_bad_prompt_file(run_dir, tmp_path):
    assert_one_line_error(craft_sample(run_dir, '--prompt-file', tmp_path / 'missing.txt'))
    (tmp_path / 'latin1.txt').write_bytes('Señor'.encode('latin-1'))
    assert_one_line_error(craft_sample(run_dir, '--prompt-file', tmp_path / 'latin1.txt'))


def test_help_shows_the_draft_flags():
    r = craft_sample('--help')
    assert r.returncode == 0
    text = ' '.join(r.stdout.split())
    assert re.search(r'--draft TEXT a small model.s run directory .* None = no draft \(default: None\)', text), text
    assert '--draft-k INT with --draft: characters the draft guesses per round (default: 3)' in text, text
    assert "or ngram[:N]: counts of the next character after N characters of RUN's training text (no N: the order, counted so or distilled from the model's own predictions, whose guesses it keeps most often, measured; no training)" in text, text


def test_draft_gives_the_same_greedy_text(run_dir, draft_run):
    "Speculative decoding keeps the model's distribution: greedy text with a draft is the plain greedy text."
    common = [run_dir, '--prompt', 'KING', '--max-new-tokens', '80', '--temperature', '0', '--device', 'cpu', '--dtype', 'float32']
    plain, drafted = craft_sample(*common), craft_sample(*common, '--draft', draft_run, '--draft-k', '3')
    assert plain.returncode == 0 and drafted.returncode == 0, drafted.stderr
    assert drafted.stdout == plain.stdout and len(plain.stdout.strip()) >= 40
    speed, kept = drafted.stderr.strip().splitlines()[-2:]
    assert 'tokens/s' in speed and re.fullmatch(r'draft: \d+ of \d+ guesses kept \(\d+%\), k=3', kept), drafted.stderr
    assert 'draft:' not in plain.stderr


def test_sampled_text_with_a_draft(run_dir, draft_run):
    r = craft_sample(run_dir, '--prompt', 'KING', '--max-new-tokens', '60', '--seed', '2', '--device', 'cpu', '--draft', draft_run)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.rstrip('\n')) == 60 and re.search(r'guesses kept .*k=3$', r.stderr.strip())


def test_draft_with_another_alphabet(run_dir, tmp_path):
    from craft.model import GPT, GPTConfig
    from craft.rundir import save_checkpoint
    from craft.tokenizer import CharTokenizer
    other = CharTokenizer.from_text('abcdefgh ')
    save_checkpoint(tmp_path / 'other.safetensors', GPT(GPTConfig.from_preset('tiny', vocab_size=other.vocab_size)), other)
    r = craft_sample(run_dir, '--prompt', 'KING', '--device', 'cpu', '--draft', tmp_path / 'other.safetensors')
    assert_one_line_error(r)
    assert 'knows other characters' in r.stderr and r.stdout == ''


@pytest.mark.parametrize('flags,message', [(['--num-samples', '2'], 'not --num-samples 2'), (['--compile'], 'drop --compile'),
                                           (['--no-cache'], 'drop --no-cache'), (['--draft-k', '0'], 'k=0')])
def test_draft_refuses_what_it_cannot_do(run_dir, draft_run, flags, message):
    r = craft_sample(run_dir, '--device', 'cpu', '--draft', draft_run, *flags)
    assert_one_line_error(r)
    assert message in r.stderr


def test_missing_draft(run_dir, tmp_path):
    r = craft_sample(run_dir, '--device', 'cpu', '--draft', tmp_path / 'nope')
    assert_one_line_error(r)
    assert 'draft' in r.stderr and 'no such file or directory' in r.stderr


def test_ngram_draft_gives_the_same_greedy_text(run_dir):
    "`--draft ngram` counts a draft from the run's own training text: no draft model, the same greedy text."
    common = [run_dir, '--prompt', 'KING', '--max-new-tokens', '80', '--temperature', '0', '--device', 'cpu', '--dtype', 'float32']
    plain = craft_sample(*common)
    for spec, k in (('ngram', '4'), ('ngram:2', '6')):
        drafted = craft_sample(*common, '--draft', spec, '--draft-k', k)
        assert drafted.returncode == 0 and drafted.stdout == plain.stdout, drafted.stderr
        assert re.fullmatch(rf'draft: \d+ of \d+ guesses kept \(\d+%\), k={k}', drafted.stderr.strip().splitlines()[-1]), drafted.stderr
        assert ('n-gram draft of order' in drafted.stderr) == (spec == 'ngram'), drafted.stderr   # no N: measured, and said
    sampled = craft_sample(run_dir, '--prompt', 'KING', '--max-new-tokens', '60', '--seed', '2', '--device', 'cpu', '--draft', 'ngram')
    assert sampled.returncode == 0 and len(sampled.stdout.rstrip('\n')) == 60, sampled.stderr


def test_ngram_draft_refusals(run_dir, tiny_run_copy, tmp_path):
    "A corpus that is gone, a checkpoint file (no corpus named) and a malformed order: one line each, nothing printed."
    config = json.loads((tiny_run_copy / 'config.json').read_text())
    config['corpus'] = {'path': str(tmp_path / 'gone.txt'), 'bundled': False, 'files': 1, 'fingerprint': '0'}
    (tiny_run_copy / 'config.json').write_text(json.dumps(config))
    for args, message in (([tiny_run_copy, '--draft', 'ngram'], 'restore that text'),
                          ([run_dir / 'best.safetensors', '--draft', 'ngram'], 'not a run directory'),
                          ([run_dir, '--draft', 'ngram:x'], 'ngram:N')):
        r = craft_sample(*args, '--device', 'cpu')
        assert_one_line_error(r)
        assert message in r.stderr and r.stdout == '', r.stderr


LOSS_BOUND = 0.001   # craft.sampling.INT8_LOSS_BOUND, as the issue states it


def test_quantize_auto_names_its_choice(run_dir):
    "`--quantize auto` (the default) says which weights it chose and why, and keeps to the rule; `none` and `int8` force."
    common = [run_dir, '--prompt', 'KING', '--max-new-tokens', '20', '--device', 'cpu', '--dtype', 'float32']
    runs = {q: craft_sample(*common, *(['--quantize', q] if q else [])) for q in (None, 'none', 'int8')}
    assert all(r.returncode == 0 for r in runs.values()), [r.stderr for r in runs.values()]
    (profile, speed), forced_float, forced_int8 = (runs[q].stderr.strip().splitlines()[-2:] for q in runs)
    chose = re.search(r'; int8 weights: (\d+\.\d+)x faster, loss ([+-]\d\.\d{4})|; float weights: int8 \d+\.\d+x (slower here|faster, but loss [+-]\d\.\d{4} \(bound 0\.001\))', profile)
    assert chose, profile
    assert (chose[1] is not None) == speed.endswith(', int8 weights)'), (profile, speed)   # the weights it named are the weights used
    if chose[1] is not None: assert float(chose[1]) > 1 and abs(float(chose[2])) < LOSS_BOUND, profile
    assert forced_float[0].endswith('; float weights, as asked') and not forced_float[1].endswith(', int8 weights)'), forced_float
    assert forced_int8[0].endswith('; int8 weights, as asked') and forced_int8[1].endswith(', int8 weights)'), forced_int8


def test_quantize_auto_keeps_a_bare_checkpoint_float(run_dir, tmp_path):
    "Without its run directory a checkpoint's validation loss cannot be measured: float weights, and the line says why."
    bare = tmp_path / 'bare.safetensors'
    bare.write_bytes((run_dir / 'best.safetensors').read_bytes())
    fresh = {'CRAFT_CACHE_DIR': str(tmp_path / 'cache')}           # a machine where no copy of it was checked
    r = craft_sample(bare, '--max-new-tokens', '10', '--device', 'cpu', '--dtype', 'float32', env=fresh)
    assert r.returncode == 0, r.stderr
    profile, speed = r.stderr.strip().splitlines()[-2:]
    assert re.search(r'; float weights: int8 \d+\.\d+x (slower here|faster, but its loss cannot be checked: .*bare checkpoint)', profile), profile
    assert not speed.endswith(', int8 weights)'), speed


def test_help_documents_quantize():
    r = craft_sample('--help')
    text = ' '.join(r.stdout.split())
    assert r.returncode == 0 and re.search(r"--quantize TEXT weights: auto \(int8 where timed faster .*none \(float\) \(default: 'auto'\)", text), text
