"`craft sample` through the command line, in subprocesses (`python -m craft.cli sample ...`)."
import os, subprocess, sys

import pytest


@pytest.fixture(scope='module')
def run_dir(tiny_run):
    "The tiny run (the CLI only needs a valid checkpoint)."
    return tiny_run


def craft_sample(*args):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}   # a tiny model: one thread is fastest, and robust to busy cores
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
