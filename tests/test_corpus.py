"""Corpora as users have them (03b_corpus): folders with empty, binary and non-UTF-8 files, globs, changed text, more
than 256 characters, a preparation killed half-way, a damaged cache, and evaluation on a token budget."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
from conftest import TINY, assert_one_line_error, craft, metrics   # fixtures: env

SHORT = [*TINY, '--threads', 1, '--max-iters', 4, '--eval-interval', 2, '--eval-iters', 1, '--sample-chars', 0]
PROSE = 'It was the best of times, it was the worst of times, it was the age of wisdom.\n' * 40


def python(env, code: str, *args, timeout=120):
    return subprocess.run([sys.executable, '-c', code, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)


def folder_as_users_have_it(root: Path) -> Path:
    "Text in a tree, with an empty file, a binary one, a Latin-1 one, a UTF-16 one and a hidden folder."
    files = {'a/one.txt': PROSE.encode(), 'a/two.md': PROSE.upper().encode(), 'b/empty.txt': b'',
             'b/logo.png': b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR', 'b/latin.txt': 'caf\xe9 cr\xe8me\n'.encode('latin1'),
             'c/wide.txt': 'hello'.encode('utf-16'), '.git/objects': b'\x00' * 64}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_a_folder_trains_on_its_text_and_says_what_it_skipped(env, tmp_path):
    data = folder_as_users_have_it(tmp_path / 'tree')
    result = craft(env, 'train', *SHORT, '--data', data, '--out', tmp_path / 'run')
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stderr.splitlines() if 'skipped' in line)
    assert 'skipped 1 empty, 1 binary, 1 UTF-16 and 1 not UTF-8 files of 6 (list: ' in line
    listed = Path(line.split('(list: ')[1].rstrip(')')).read_text().splitlines()
    assert sorted(entry.split('\t')[0] for entry in listed) == ['UTF-16', 'binary', 'empty', 'not UTF-8']
    tokenizer = json.loads((tmp_path / 'run' / 'tokenizer.json').read_text())
    assert set(tokenizer['chars']) == set(PROSE + PROSE.upper() + '\n')       # the kept files' characters only
    assert json.loads((tmp_path / 'run' / 'config.json').read_text())['corpus']['files'] == 6


def test_a_folder_with_no_text_is_one_line(env, tmp_path):
    (tmp_path / 'bin').mkdir()
    (tmp_path / 'bin' / 'a.png').write_bytes(b'\x00\x01'); (tmp_path / 'bin' / 'b.txt').write_bytes(b'')
    assert_one_line_error(craft(env, 'train', *SHORT, '--data', tmp_path / 'bin', '--out', tmp_path / 'run'),
                          'no text left', 'skipped 1 empty and 1 binary files of 2')
    assert not (tmp_path / 'run').exists()


def test_a_glob_takes_the_files_it_matches(env, tmp_path):
    data = folder_as_users_have_it(tmp_path / 'tree')
    result = craft(env, 'train', *SHORT, '--data', f"{data}/**/*.txt", '--out', tmp_path / 'run')
    assert result.returncode == 0, result.stderr
    corpus = json.loads((tmp_path / 'run' / 'config.json').read_text())['corpus']
    assert corpus['path'] == f"{data}/**/*.txt" and corpus['files'] == 4              # one, empty, latin, wide
    assert 'skipped 1 empty, 1 UTF-16 and 1 not UTF-8 files of 4' in result.stderr
    assert_one_line_error(craft(env, 'train', *SHORT, '--data', f"{data}/**/*.rs", '--out', tmp_path / 'none'),
                          'the pattern matches no files')


def test_a_changed_corpus_is_refused_on_resume_and_prepared_again_for_a_new_run(env, tmp_path):
    data = tmp_path / 'corpus'; data.mkdir()
    (data / 'a.txt').write_text(PROSE); (data / 'b.txt').write_text(PROSE.lower())
    assert craft(env, 'train', *SHORT, '--data', data, '--out', tmp_path / 'run').returncode == 0
    (data / 'b.txt').write_text(PROSE.lower() + 'a new line.\n')
    assert_one_line_error(craft(env, 'train', '--resume', tmp_path / 'run', '--max-iters', 6),
                          'cannot resume', 'has changed since the run began')
    result = craft(env, 'train', *SHORT, '--data', data, '--out', tmp_path / 'new')
    assert result.returncode == 0, result.stderr
    recorded = [json.loads((tmp_path / r / 'config.json').read_text())['corpus']['fingerprint'] for r in ('run', 'new')]
    assert recorded[0] != recorded[1]
    cached = sorted(p.name for p in (Path(env['CRAFT_CACHE_DIR']) / 'tokens').glob('*.json'))
    assert any(name.startswith(recorded[1]) for name in cached)                        # the new text has its own entry


def test_more_than_256_characters_take_two_bytes_a_token(env, tmp_path):
    text = ''.join(chr(0x4E00 + i) for i in range(300)) * 4 + PROSE                      # 300 CJK characters and prose
    (tmp_path / 'wide.txt').write_text(text)
    code = ("import sys; from craft.corpus import load_tokens, read_corpus\n"
            "ids, tok = load_tokens(sys.argv[1]); print(ids.dtype, tok.vocab_size, tok.decode(ids) == read_corpus(sys.argv[1]))")
    result = python(env, code, tmp_path / 'wide.txt')
    assert result.stdout.split() == ['uint16', str(len(set(text))), 'True'], result.stderr
    assert craft(env, 'train', *SHORT, '--data', tmp_path / 'wide.txt', '--out', tmp_path / 'run').returncode == 0


def test_a_killed_preparation_leaves_no_cache_that_a_later_run_trusts(env, tmp_path):
    "A 64 MB corpus (pieces on two workers), killed as soon as the ids file is being written; then a damaged cache."
    data = tmp_path / 'big'; data.mkdir()
    line = b'the quick brown fox jumps over the lazy dog, and then it naps\n'
    for i in range(4): (data / f"part{i}.txt").write_bytes(line * (16 * 2**20 // len(line)))
    cache = tmp_path / 'cache'
    job = {**env, 'CRAFT_CACHE_DIR': str(cache)}
    load = "import sys; from craft.corpus import load_tokens; ids, tok = load_tokens(sys.argv[1]); print(len(ids), int(ids[-1]))"
    p = subprocess.Popen([sys.executable, '-c', load, str(data)], env=job, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((cache / 'tokens').glob('.*.tmp')) and p.poll() is None and time.monotonic() < deadline: time.sleep(0.005)
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert not list((cache / 'tokens').glob('*.json'))                   # no record, so no entry is trusted
    result = python(job, load, data)
    assert result.returncode == 0, result.stderr
    n, last = result.stdout.split()
    assert int(n) == 4 * (16 * 2**20 // len(line)) * len(line) + 3 * 2              # every byte, and 3 separators
    tokens = next((cache / 'tokens').glob('*.tokens'))
    with open(tokens, 'r+b') as f: f.seek(100); f.write(b'\xff')                   # an id out of range, the time changed
    again = python(job, load, data)
    assert again.returncode == 0 and again.stdout == result.stdout, again.stderr   # prepared again, not trusted
    assert np.fromfile(tokens, np.uint8, count=200).max() < 40
    (cache / 'tokens' / tokens.name.replace('.tokens', '.json')).write_text('{"format": "craft.tokens", "version"')
    assert python(job, load, data).stdout == result.stdout                            # a cut record: prepared again


def test_whole_split_evaluations_keep_to_their_budget_and_say_so(env, tmp_path):
    args = [*TINY, '--threads', 1, '--max-iters', 4, '--eval-interval', 2, '--eval-iters', 0, '--sample-chars', 0, '--block-size', 32]
    runs = [tmp_path / 'a', tmp_path / 'b']
    for run in runs: assert craft(env, 'train', *args, '--eval-tokens', 2048, '--out', run).returncode == 0
    status = [json.loads((run / 'status.json').read_text()) for run in runs]
    assert status[0]['full_val_tokens'] == status[1]['full_val_tokens'] == 2048      # 64 windows of 32 tokens
    assert status[0]['full_val_loss'] == status[1]['full_val_loss']
    evals = [m for m in metrics(runs[0]) if 'val_loss' in m]
    assert evals and all(m['val_tokens'] == 2048 for m in evals)
    whole = craft(env, 'train', *args, '--eval-tokens', 0, '--out', tmp_path / 'c')
    assert whole.returncode == 0, whole.stderr
    assert json.loads((tmp_path / 'c' / 'status.json').read_text())['full_val_tokens'] == (111_540 - 1) // 32 * 32
