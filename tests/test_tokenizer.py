"Black-box tests of craft.tokenizer against the installed package."
import codecs, json, random

import numpy as np
import pytest

from craft.errors import CraftError
from craft.tokenizer import CharTokenizer, load_text, shakespeare_path

SAMPLES = ['Hello, World!', 'café', 'naïve', '日本語', '🙂👍🏽', 'e\u0301', 'a\r\nb\r\n', 'x\ty\t\tz', ' \n ', '\x00\U0010ffff']


@pytest.fixture(scope='module')
def shakespeare():
    return load_text(shakespeare_path())


@pytest.fixture(scope='module')
def tok_all():
    return CharTokenizer.from_text(''.join(SAMPLES))


def test_bundled_corpus_installed(shakespeare):
    path = shakespeare_path()
    assert path.is_file() and path.name == 'tinyshakespeare.txt'
    assert len(shakespeare) == 1_115_394 and len(set(shakespeare)) == 65


def test_shakespeare_round_trip(shakespeare):
    tok = CharTokenizer.from_text(shakespeare)
    ids = tok.encode(shakespeare)
    assert tok.vocab_size == len(tok) == 65 and tok.unk_id is None
    assert ids.shape == (len(shakespeare),) and ids.dtype == np.uint16
    assert tok.decode(ids) == shakespeare


@pytest.mark.parametrize('text', SAMPLES)
def test_round_trip(tok_all, text):
    ids = tok_all.encode(text)
    assert ids.shape == (len(text),)
    assert tok_all.decode(ids) == text


def test_random_unicode_round_trip():
    alphabet = ''.join(SAMPLES) + 'ßøÆ€\u200d\u00a0\x7fΩж中文🎉'
    text = ''.join(random.Random(1234).choice(alphabet) for _ in range(20_000))
    tok = CharTokenizer.from_text(alphabet)
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(list(tok.encode(text))) == text


def test_ids_are_sorted_ranks():
    tok = CharTokenizer.from_text('cab')
    assert tok.chars == ['a', 'b', 'c']
    assert tok.encode('abcab').tolist() == [0, 1, 2, 0, 1]
    assert tok.encode('').shape == (0,)


def test_a_grown_vocabulary_keeps_its_order():
    "A fine-tuned model appends new characters after its parent's: id i is chars[i], whatever the order."
    tok = CharTokenizer('cab!')
    assert tok.encode('abc!x', on_unknown='drop').tolist() == [1, 2, 0, 3]
    assert tok.decode(tok.encode('!cab')) == '!cab'
    assert CharTokenizer.from_dict(tok.to_dict()) == tok


def test_decode_inputs():
    import torch
    tok = CharTokenizer('abc')
    assert tok.decode(torch.tensor([2, 0, 1])) == 'cab'
    assert tok.decode(np.array([2, 0], dtype=np.int8)) == 'ca'
    assert tok.decode((1,)) == 'b' and tok.decode(torch.tensor(1)) == 'b' and tok.decode([]) == ''
    for bad in ([3], [-1], [[0, 1]], [0.5]):
        with pytest.raises(CraftError):
            tok.decode(bad)


def test_unknown_policies():
    tok, tok_unk = CharTokenizer('abc'), CharTokenizer('abc', unk=True)
    with pytest.raises(CraftError, match=r"'é' \(U\+00E9\) at index 2"):
        tok.encode('abé')
    with pytest.raises(CraftError):
        tok.encode('abé', on_unknown='unk')            # no unk id
    assert tok_unk.unk_id == 3 and tok_unk.vocab_size == 4
    assert tok_unk.encode('aéb', on_unknown='unk').tolist() == [0, 3, 1]
    assert tok_unk.decode([0, 3]) == 'a\ufffd'
    assert tok.encode('aéb', on_unknown='drop').tolist() == [0, 1]


def test_save_load_round_trip(tmp_path, tok_all):
    for tok in (tok_all, CharTokenizer('ab', unk=True)):
        path = tok.save(tmp_path / 'deep' / 'tok.json')
        loaded = CharTokenizer.load(path)
        assert loaded == tok and loaded.unk_id == tok.unk_id
        d = json.loads(path.read_text(encoding='utf-8'))
        assert d['format'] == 'craft.tokenizer' and d['version'] == 1 and d == tok.to_dict()
        assert CharTokenizer.from_dict(d) == tok


@pytest.mark.parametrize('content, message', [
    (None, 'not found'),
    ('{"format": "craft.tokenizer", "version": 1, "chars": "ab', 'invalid JSON'),          # truncated
    ('{"format": "craft.tokenizer", "version": 1, "chars": "ab", "unk": fal}', 'invalid JSON'),  # corrupt
    ('{"name": "bert", "vocab": ["a"]}', 'not a craft tokenizer'),                          # foreign
    ('{"format": "craft.tokenizer", "version": 7, "chars": "ab"}', 'version 7'),
    ('{"format": "craft.tokenizer", "version": 1, "chars": "aab"}', 'twice'),
    ('{"format": "craft.tokenizer", "version": 1, "chars": 5}', "'chars' must be a string"),
])
def test_load_failures(tmp_path, content, message):
    path = tmp_path / 'tok.json'
    if content is not None: path.write_text(content, encoding='utf-8')
    with pytest.raises(CraftError, match=message) as e:
        CharTokenizer.load(path)
    assert 'tok.json' in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('data, message', [
    (b'', 'is empty'),
    ('caf\u00e9'.encode('latin-1'), r'not UTF-8 text: byte 0xe9 at offset 3'),
    (b'\x89PNG\r\n\x1a\n\x00\x00', 'looks binary'),
    ('hi'.encode('utf-16'), 'UTF-16'),
])
def test_load_text_failures(tmp_path, data, message):
    path = tmp_path / 'corpus.txt'
    path.write_bytes(data)
    with pytest.raises(CraftError, match=message) as e:
        load_text(path)
    assert 'corpus.txt' in str(e.value)


def test_load_text_exact(tmp_path):
    (tmp_path / 'c.txt').write_bytes(codecs.BOM_UTF8 + 'a\r\nb\tć\n'.encode())
    assert load_text(tmp_path / 'c.txt') == 'a\r\nb\tć\n'
    with pytest.raises(CraftError, match='not found'):
        load_text(tmp_path / 'missing.txt')
    with pytest.raises(CraftError, match='directory'):
        load_text(tmp_path)
