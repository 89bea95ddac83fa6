"Black-box tests of craft.sampling against the installed package."
import contextlib, io, threading

import numpy as np
import pytest
import torch

from craft.errors import CraftError
from craft.model import GPT, GPTConfig
from craft.sampling import (Decoder, GenerationConfig, RowText, apply_min_p, apply_repetition_penalty, apply_temperature,
                            apply_top_k, apply_top_p, generate, next_tokens, presence_mask, sampling_settings, stream)
from craft.sample import sample_command
from craft.widget import sampler_app
from craft.tokenizer import CharTokenizer, load_text, shakespeare_path

PROMPT = 'ROMEO:\nIs the day so young?'   # 26 characters; the tiny preset's window is 32


@pytest.fixture(scope='session')
def trained(model):
    "The served model (a tiny GPT trained for a few seconds on Tiny Shakespeare, float32 on the CPU), and its tokenizer."
    return model


@pytest.fixture(scope='session')
def run_dir(served_run): return served_run


@pytest.fixture(scope='session')
def random_model(trained):
    torch.manual_seed(1)
    return GPT(GPTConfig.from_preset('tiny', vocab_size=trained[1].vocab_size)).eval()


# --- settings ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('field,value,message', [
    ('temperature', -1, 'temperature=-1.0 must be 0 (greedy) or >= 1e-4'), ('top_k', -1, 'top_k=-1 must be >= 0'),
    ('top_k', 1.5, 'top_k=1.5 must be an integer'), ('top_p', 0, 'top_p=0.0 must be in [1e-6, 1]'),
    ('top_p', 2, 'top_p=2.0 must be in [1e-6, 1]'), ('min_p', 1, 'min_p=1.0 must be in [0, 1)'),
    ('min_p', -0.1, 'min_p=-0.1'), ('repetition_penalty', 0, 'repetition_penalty=0.0 must be in [0.01, 100]'),
    ('max_new_tokens', -1, 'max_new_tokens=-1 must be >= 0'), ('num_samples', 0, 'num_samples=0 must be >= 1'),
    ('seed', 'x', "seed='x'"), ('stop', [''], 'stop='), ('temperature', float('inf'), 'must be a finite number'),
])
def test_config_validation(field, value, message):
    with pytest.raises(CraftError, match=None) as e: GenerationConfig(**{field: value})
    assert message in str(e.value) and '\n' not in str(e.value)


def test_config_defaults_and_normalisation():
    c = GenerationConfig(temperature=1, stop='END')
    assert c.temperature == 1.0 and isinstance(c.temperature, float) and c.stop == ['END']
    assert GenerationConfig().top_k == 0 and GenerationConfig().top_p == 1.0


# --- transforms -------------------------------------------------------------------------------------------

def test_temperature():
    l = torch.tensor([[2.0, 1.0, 0.0]])
    assert torch.allclose(apply_temperature(l, 0.5), l * 2)
    assert torch.equal(apply_temperature(l, 0).isfinite(), torch.tensor([[True, False, False]]))
    assert apply_temperature(l, 1.0) is l
    per_row = apply_temperature(l.expand(2, 3), torch.tensor([0.5, 0.0]))
    assert torch.allclose(per_row[0], l[0] * 2) and per_row[1].isfinite().sum() == 1


def test_top_k():
    l = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    assert apply_top_k(l, 2).isfinite().tolist() == [[True, False, True, False]]
    assert torch.equal(apply_top_k(l, 0), l)
    assert apply_top_k(l.expand(2, 4), torch.tensor([1, 3])).isfinite().sum(-1).tolist() == [1, 3]


def test_top_p():
    l = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert apply_top_p(l, 0.75).isfinite().tolist() == [[True, True, False, False]]
    assert apply_top_p(l, 0.9).isfinite().tolist() == [[True, True, True, False]]
    assert apply_top_p(l, 1e-9).isfinite().sum() == 1
    assert torch.equal(apply_top_p(l, 1.0), l)


def test_min_p():
    l = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert apply_min_p(l, 0.5).isfinite().tolist() == [[True, True, False, False]]
    assert apply_min_p(l, 0.05).isfinite().all()


def test_repetition_penalty_hf_semantics():
    l = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = presence_mask(torch.tensor([[0, 1, 0]]), 4)
    assert apply_repetition_penalty(l, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]
    assert l.tolist() == [[2.0, -2.0, 1.0, -1.0]]   # pure


def test_next_tokens_per_row_settings():
    l = torch.randn(6, 65, generator=torch.Generator().manual_seed(0))
    settings = sampling_settings([GenerationConfig(temperature=0), GenerationConfig(top_k=1)] * 3)
    assert next_tokens(l, torch.Generator().manual_seed(0), **settings).tolist() == l.argmax(-1).tolist()
    g = lambda: torch.Generator().manual_seed(3)
    assert torch.equal(next_tokens(l, g(), temperature=1.3), next_tokens(l, g(), temperature=1.3))


# --- decoder and engine -----------------------------------------------------------------------------------

@pytest.mark.parametrize('which', ['trained', 'random'])
def test_greedy_cache_equals_no_cache(trained, random_model, which):
    model, tok = trained if which == 'trained' else (random_model, trained[1])
    cached = generate(model, tok, PROMPT, max_new_tokens=80, temperature=0)[0]
    plain = generate(model, tok, PROMPT, max_new_tokens=80, temperature=0, use_cache=False)[0]
    first_slide = 32 - len(PROMPT) + 1   # tokens computed before the cache is full
    assert cached[:first_slide] == plain[:first_slide]
    assert len(cached) == len(plain) == 80
    assert generate(model, tok, PROMPT, max_new_tokens=80, temperature=0, window_keep=1.0)[0] == plain


def test_greedy_cache_equals_no_cache_without_slides(trained):
    tok = trained[1]
    torch.manual_seed(2)
    wide = GPT(GPTConfig.from_preset('tiny', vocab_size=tok.vocab_size, block_size=128)).eval()
    kw = dict(max_new_tokens=100, temperature=0, num_samples=2)
    assert generate(wide, tok, PROMPT, **kw) == generate(wide, tok, PROMPT, use_cache=False, **kw)


@pytest.mark.parametrize('use_cache', [True, False])
def test_long_prompt_and_long_generation(trained, use_cache):
    model, tok = trained
    prompt = load_text(shakespeare_path())[:300]
    s = stream(model, tok, prompt, max_new_tokens=200, use_cache=use_cache, seed=0, num_samples=2)
    chunks = list(s)
    assert [len(t) for t in s.texts] == [200, 200] and s.n_tokens == 400
    assert all(set(t) <= set(tok.chars) for t in s.texts)
    assert ''.join(t for r, t in chunks if r == 1) == s.texts[1]


def test_decoder_slides_and_shapes(trained):
    model, tok = trained
    ids = torch.from_numpy(tok.encode(load_text(shakespeare_path())[:100]).astype(np.int64)).expand(3, -1)
    d = Decoder(model, 3, window_keep=0.5)
    assert d.prefill(ids[:, :40]).shape == (3, tok.vocab_size)   # longer than the window: its last 32
    for t in range(40, 100): assert d.step(ids[:, t]).shape == (3, tok.vocab_size)
    assert d.keep == 16 and d.n_slides == 60 // 16 + 1 and torch.equal(d.context(), ids[:, -32:])


def test_seeded_reproducibility(trained):
    model, tok = trained
    kw = dict(max_new_tokens=50, temperature=1.0, num_samples=3)
    a = generate(model, tok, 'KING', seed=11, **kw)
    assert a == generate(model, tok, 'KING', seed=11, **kw)
    assert a != generate(model, tok, 'KING', seed=12, **kw)
    s = stream(model, tok, 'KING', **kw)
    list(s)
    assert generate(model, tok, 'KING', seed=s.seed, **kw) == s.texts   # the chosen seed reproduces it


def test_num_samples_batch(trained):
    model, tok = trained
    texts = generate(model, tok, 'KING', max_new_tokens=40, temperature=1.0, seed=0, num_samples=5)
    assert len(texts) == 5 and all(len(t) == 40 for t in texts) and len(set(texts)) == 5


def test_controls_reduce_to_greedy(trained):
    model, tok = trained
    greedy = generate(model, tok, 'KING', max_new_tokens=50, temperature=0)[0]
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=0.999)):
        assert generate(model, tok, 'KING', max_new_tokens=50, temperature=2.0, seed=5, **kw)[0] == greedy, kw
    assert generate(model, tok, 'KING', max_new_tokens=50, temperature=2.0, seed=5)[0] != greedy
    penalised = generate(model, tok, 'KING', max_new_tokens=50, temperature=0, repetition_penalty=3.0)[0]
    assert len(set(penalised)) > len(set(greedy))


def test_stop_strings(trained):
    model, tok = trained
    greedy = generate(model, tok, 'KING', max_new_tokens=80, temperature=0)[0]
    stop = greedy[25:28]
    cut = greedy[:greedy.find(stop)]
    assert generate(model, tok, 'KING', max_new_tokens=80, temperature=0, stop=[stop])[0] == cut
    stops = [greedy[40:44], stop, 'qqq']
    earliest = min(greedy.find(s) for s in stops if s in greedy)
    assert generate(model, tok, 'KING', max_new_tokens=80, temperature=0, stop=stops)[0] == greedy[:earliest]
    s = stream(model, tok, 'KING', max_new_tokens=80, temperature=0, stop=stop)
    chunks = [t for _, t in s]
    assert ''.join(chunks) == cut and s.finish_reason == 'stop' and s.n_tokens < 80


def test_stop_strings_per_row(trained):
    model, tok = trained
    s = stream(model, tok, 'KING', max_new_tokens=400, temperature=1.0, seed=1, num_samples=4, stop=['e', 'a'])
    list(s)
    assert all('e' not in t and 'a' not in t for t in s.texts) and s.finish_reason == 'stop'


def test_row_text_holds_back_prefixes():
    r = RowText(['\n\n'])
    assert [r.add(c) for c in 'a\nb\n'] == ['a', '', '\nb', '']
    assert r.add('\nrest') == '' and r.text == 'a\nb' and r.stopped
    r = RowText(['xyz'])
    assert r.add('abxy') == 'ab' and r.flush() == 'xy' and r.text == 'abxy'


def test_unknown_characters_and_empty_prompt(trained):
    model, tok = trained
    with pytest.raises(CraftError, match="'é'"): generate(model, tok, 'café', max_new_tokens=3)
    assert len(generate(model, tok, 'café', max_new_tokens=3, on_unknown='drop')[0]) == 3
    with pytest.raises(CraftError, match='the prompt is empty'): generate(model, tok, '', max_new_tokens=3)


def test_cancel(trained):
    model, tok = trained
    cancel = threading.Event()
    s = stream(model, tok, 'a', max_new_tokens=1000, cancel=cancel)
    got = []
    for _, t in s:
        got.append(t)
        if len(got) == 10: cancel.set()
    assert 10 <= len(got) <= 12 and s.finish_reason == 'cancelled'


def test_tokenizer_must_match_model(trained):
    model, _ = trained
    with pytest.raises(CraftError, match='the tokenizer has 3 tokens'): generate(model, CharTokenizer('abc'), 'a')


# --- sample_command and the app ---------------------------------------------------------------------------

def test_sample_command_streams(run_dir, trained, capsys):
    texts = sample_command(str(run_dir), prompt='KING', max_new_tokens=30, seed=3, num_samples=3, echo=True, dtype='float32')  # as `model`
    out, err = capsys.readouterr()
    assert out.startswith('--- sample 1 ---\nKING' + texts[0])
    assert all(f'--- sample {i} ---\nKING' in out for i in (2, 3)) and out.endswith('\n')
    assert '90 tokens in' in err and 'tokens/s' in err and 'seed 3' in err
    model, tok = trained
    assert texts == generate(model, tok, 'KING', max_new_tokens=30, seed=3, num_samples=3)


def test_sample_command_prompt_file_and_errors(run_dir, tmp_path, capsys):
    (tmp_path / 'p.txt').write_text('KING', encoding='utf-8')
    a = sample_command(str(run_dir), prompt_file=str(tmp_path / 'p.txt'), max_new_tokens=10, temperature=0, cache=False)
    assert a == sample_command(str(run_dir), prompt='KING', max_new_tokens=10, temperature=0)
    (tmp_path / 'bad.txt').write_bytes(b'\xff\xfe\x00abc')
    for kw, message in [(dict(prompt_file=str(tmp_path / 'none.txt')), 'prompt file'),
                        (dict(prompt_file=str(tmp_path / 'bad.txt')), 'prompt file'),
                        (dict(temperature=-1.0), 'temperature'), (dict(top_p=2.0), 'top_p'),
                        (dict(device='tpu'), 'unknown device'), (dict(dtype='int4'), 'unknown dtype')]:
        with pytest.raises(CraftError, match=message): sample_command(str(run_dir), **kw)
    with pytest.raises(CraftError, match='no such file'): sample_command(str(tmp_path / 'missing'))
    (tmp_path / 'broken').mkdir()
    (tmp_path / 'broken' / 'best.safetensors').write_bytes(b'garbage' * 10)
    with pytest.raises(CraftError): sample_command(str(tmp_path / 'broken'))


def test_sample_command_bfloat16(run_dir, capsys):
    texts = sample_command(str(run_dir), prompt='KING', max_new_tokens=20, dtype='bfloat16', seed=0)
    assert len(texts[0]) == 20 and 'bfloat16' in capsys.readouterr().err


def test_sampler_app(run_dir, trained):
    model, tok = trained
    app = sampler_app(run_dir, dtype='float32', quantize='none', prompt='KING', max_new_tokens=40, temperature=0.0)
    assert app.generate() == generate(model, tok, 'KING', max_new_tokens=40, temperature=0)[0]
    app.temperature, app.top_k, app.seed = 1.0, 5, 9
    app.generate_button.click(); app.wait(10)
    assert app.output_text == generate(model, tok, 'KING', max_new_tokens=40, temperature=1.0, top_k=5, seed=9)[0]
    assert app.output_box.value.endswith(f"<span style='color:#667085'>KING</span>{app.output_text}</pre>")   # the prompt, then the text
    assert app.status.value.startswith('40 characters in') and 'characters/s' in app.status.value and app.probs_view.value.count('<tr>') == 5
    app.max_new_tokens = 5000
    app.generate(block=False); app.stop(); app.wait(10)
    assert len(app.output_text) < 5000 and 'stopped' in app.status.value
    app.prompt = 'é'
    with pytest.raises(CraftError, match="'é'"): app.generate()


def test_sampler_app_with_a_draft(run_dir, trained, tmp_path):
    "A draft from a checkpoint: a checkbox and a k slider; ticked, the same greedy text and the acceptance in the status line."
    from craft.rundir import save_checkpoint
    from craft.speculative import SpeculativeStream
    model, tok = trained
    torch.manual_seed(2)
    save_checkpoint(tmp_path / 'draft.safetensors', GPT(GPTConfig.from_preset('tiny', n_layer=1, n_embd=16, vocab_size=tok.vocab_size)), tok)
    app = sampler_app(run_dir, dtype='float32', quantize='none', draft=tmp_path / 'draft.safetensors', draft_k=5, prompt='KING', max_new_tokens=60, temperature=0.0)
    assert (app.use_draft, app.k) == (True, 5) and app.k_slider in app.widget.children[1].children[0].children
    assert app.generate() == generate(model, tok, 'KING', max_new_tokens=60, temperature=0)[0]
    assert isinstance(app.last_stream, SpeculativeStream) and 'characters/s' in app.status.value and 'guesses kept' in app.status.value
    app.use_draft, app.temperature, app.seed = False, 1.0, 4
    app.generate_button.click(); app.wait(10)
    assert app.output_text == generate(model, tok, 'KING', max_new_tokens=60, temperature=1.0, seed=4)[0] and 'draft' not in app.status.value
    save_checkpoint(tmp_path / 'other.safetensors', GPT(GPTConfig.from_preset('tiny', vocab_size=3)), CharTokenizer('abc'))
    with pytest.raises(CraftError, match='knows other characters'): sampler_app(run_dir, draft=tmp_path / 'other.safetensors')


def test_compiled_decoding_is_compiled_and_gives_the_same_text(trained):
    "`compile=True` traces the decode step into a graph (dynamo counts it) and changes no token, greedy or seeded."
    from torch._dynamo.utils import counters
    model, tok = trained
    torch._dynamo.reset()                          # forget graphs compiled earlier in this process: this call must make one
    before = counters['stats']['unique_graphs']
    compiled = generate(model, tok, PROMPT, max_new_tokens=60, temperature=0, compile=True)
    assert counters['stats']['unique_graphs'] > before
    assert compiled == generate(model, tok, PROMPT, max_new_tokens=60, temperature=0)
    seeded = dict(max_new_tokens=60, seed=5, num_samples=2, top_k=10)
    assert generate(model, tok, PROMPT, compile=True, **seeded) == generate(model, tok, PROMPT, **seeded)


def test_decoders_free_their_caches_at_once(trained):
    "No reference cycle: a decoder's KV caches go as soon as the decoder does, without waiting for the garbage collector."
    import gc, weakref
    model, _ = trained
    gc.disable()
    try:
        decoder = Decoder(model, 2)
        cache = weakref.ref(decoder.caches[0].k)
        del decoder
        assert cache() is None
    finally: gc.enable()
