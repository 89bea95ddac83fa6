"Black-box tests of fine-tuning: `craft train --init-from`, in full and with LoRA; resume, the run directory, and every bad input."
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest
from conftest import craft, assert_one_line_error, metrics   # the same helpers as the other `craft train` tests

TINY = ['--preset', 'tiny', '--device', 'cpu', '--no-progress', '--dtype', 'float32']


@pytest.fixture(scope='session')
def env(tmp_path_factory):
    "Environment for the subprocesses: a private token cache, no GPU, one thread, a non-interactive plot backend."
    return {**os.environ, 'CRAFT_CACHE_DIR': str(tmp_path_factory.mktemp('cache')), 'CUDA_VISIBLE_DEVICES': '',
            'MPLBACKEND': 'Agg', 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}


def austen():
    from craft.finetune import austen_path
    return austen_path()


@pytest.fixture(scope='session')
def parent(tiny_run, tmp_path_factory):
    "The tiny run (a tiny model trained briefly on the bundled Shakespeare), copied: the run every fine-tune here starts from."
    return Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp('runs') / 'parent'))


@pytest.fixture(scope='session')
def lora_run(env, parent, tmp_path_factory):
    out = tmp_path_factory.mktemp('runs') / 'lora'
    result = craft(env, 'train', '--init-from', parent, '--data', austen(), *TINY, '--lora-rank', 4, '--max-iters', 20,
                   '--eval-interval', 10, '--out', out)
    assert result.returncode == 0, result.stderr
    return out


def test_a_lora_fine_tune_writes_its_run(lora_run, parent):
    import torch
    from craft.rundir import load_checkpoint
    from craft.finetune import read_lineage, load_lora
    names = {p.name for p in lora_run.iterdir()}
    assert {'config.json', 'tokenizer.json', 'best.safetensors', 'latest.safetensors', 'state.pt', 'finetune.json',
            'base.safetensors', 'adapters.safetensors', 'sample.txt'} <= names
    lineage = read_lineage(lora_run)
    assert lineage['parent'] == str(parent.resolve()) and lineage['vocab']['parent_size'] == 65
    assert lineage['vocab']['new_chars'] == '"()012456789_' and lineage['vocab']['new_ids'] == [65, 78]
    assert json.loads((lora_run / 'config.json').read_text())['train']['init_from'] == str(parent)
    model, tokenizer, config = load_checkpoint(lora_run)                      # merged: a plain GPT
    parent_tokenizer = load_checkpoint(parent)[1]
    assert tokenizer.chars[:65] == parent_tokenizer.chars and config.vocab_size == 78
    assert (lora_run / 'adapters.safetensors').stat().st_size * 4 < (lora_run / 'best.safetensors').stat().st_size
    ids = torch.from_numpy(tokenizer.encode('"Mr. Darcy," said she.')).long()[None]
    with torch.no_grad(): assert torch.allclose(load_lora(lora_run)(ids)[0], model.eval()(ids)[0], atol=1e-5)


def test_the_merged_checkpoint_samples_with_the_usual_command(env, lora_run):
    result = craft(env, 'sample', lora_run, '--prompt', '"Mr. ', '--max-new-tokens', 20, '--seed', 1, '--device', 'cpu', '--echo')
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('"Mr. ')


def test_craft_runs_shows_the_parent(env, parent, lora_run):
    result = craft(env, 'runs', lora_run.parent)
    assert result.returncode == 0, result.stderr
    header, _, row = result.stdout.splitlines()[:3]
    assert header.split()[:4] == ['name', 'date', 'preset', 'parent']
    assert row.split()[0] == 'lora' and row.split()[4] == parent.name


def test_step_zero_keeps_the_old_characters_logits(parent):
    "Built but not trained, a fine-tune (full or LoRA) gives the old characters the parent's logits, and the same greedy text."
    import torch
    from craft.rundir import load_checkpoint
    from craft.sampling import generate
    from craft.finetune import FinetuneTrainer, finetune_config, merge_adapters
    old, old_tok, _ = load_checkpoint(parent)
    for lora_rank in (None, 2):
        trainer = FinetuneTrainer(finetune_config(parent, 'tiny', data=str(austen()), lora_rank=lora_rank, device='cpu', dtype='float32'))
        new = merge_adapters(trainer.raw_model).eval()
        ids = torch.from_numpy(old_tok.encode('ROMEO:\nBut soft')).long()[None]
        with torch.no_grad(): assert torch.allclose(new(ids)[0][..., :65], old(ids)[0], atol=1e-5)
        greedy = dict(max_new_tokens=60, temperature=0.0)
        assert generate(new, trainer.tokenizer, 'ROMEO:', **greedy) == generate(old, old_tok, 'ROMEO:', **greedy)


@pytest.mark.parametrize('lora', [[], ['--lora-rank', 4]])
def test_resume_mid_fine_tune_is_exact(env, parent, tmp_path, lora):
    "N steps, then N more after a resume, log the losses of 2N straight steps, with LoRA as in full."
    common = ['--init-from', parent, '--data', austen(), *TINY, *lora, '--lr-decay-iters', 20, '--eval-interval', 10,
              '--log-interval', 1, '--no-full-eval', '--sample-chars', 0]
    assert craft(env, 'train', *common, '--max-iters', 20, '--out', tmp_path / 'straight').returncode == 0
    assert craft(env, 'train', *common, '--max-iters', 10, '--out', tmp_path / 'halves').returncode == 0
    result = craft(env, 'train', '--resume', tmp_path / 'halves', '--max-iters', 20, '--no-progress')
    assert result.returncode == 0, result.stderr
    losses = lambda d: [(r['step'], r['train_loss']) for r in metrics(d) if 'train_loss' in r]
    assert len(losses(tmp_path / 'straight')) == 20
    assert losses(tmp_path / 'halves') == losses(tmp_path / 'straight')


def test_a_corpus_with_no_old_character_trains_with_a_warning(env, parent, tmp_path):
    (tmp_path / 'greek.txt').write_text('ἐνἀρχῇἦνὁλόγος' * 300, encoding='utf-8')
    result = craft(env, 'train', '--init-from', parent, '--data', tmp_path / 'greek.txt', *TINY, '--max-iters', 4,
                   '--eval-interval', 2, '--sample-chars', 0, '--out', tmp_path / 'greek')
    assert result.returncode == 0, result.stderr
    assert 'warning: the corpus shares no character with the vocabulary' in result.stderr
    assert json.loads((tmp_path / 'greek' / 'status.json').read_text())['status'] == 'finished'


@pytest.mark.parametrize('args, fragments', [
    (['--init-from', 'NOWHERE'], ['--init-from', 'no such run directory']),
    (['--init-from', 'NOT_A_RUN'], ['is not a craft run']),
    (['--init-from', 'PARENT', '--lora-rank', 0], ['lora_rank=0 must be at least 1']),
    (['--init-from', 'PARENT', '--lora-rank', 33], ['lora_rank=33 is larger than the matrix blocks.0.attn.qkv (96x32)']),
    (['--init-from', 'PARENT', '--lora-rank', 2, '--lora-targets', 'attn,ffn'], ["unknown matrices ['ffn']"]),
    (['--init-from', 'PARENT', '--n-layer', 3], ['n_layer=3 (the run: 2) contradicts']),
    (['--lora-rank', 4], ['lora_rank=4 needs --init-from RUN']),
])
def test_bad_fine_tunes(env, parent, tmp_path, args, fragments):
    (tmp_path / 'not-a-run').mkdir()
    args = [{'NOWHERE': tmp_path / 'nowhere', 'NOT_A_RUN': tmp_path / 'not-a-run', 'PARENT': parent}.get(a, a) for a in args]
    assert_one_line_error(craft(env, 'train', *args, '--data', austen(), *TINY, '--out', tmp_path / 'run'), *fragments)
    assert not (tmp_path / 'run').exists()


def test_a_resumed_fine_tune_keeps_its_lora_settings(env, lora_run, parent):
    before = (lora_run / 'state.pt').read_bytes()
    assert_one_line_error(craft(env, 'train', '--resume', lora_run, '--max-iters', 30, '--lora-rank', 8), 'with another lora_rank')
    assert_one_line_error(craft(env, 'train', '--resume', parent, '--max-iters', 40, '--init-from', lora_run), 'not fine-tuned')
    assert (lora_run / 'state.pt').read_bytes() == before


def test_our_lora_matches_peft():
    "PEFT's LoRA layers, given our A and B, compute what ours compute."
    import copy, torch
    from peft import LoraConfig, inject_adapter_in_model
    from craft.model import GPT, GPTConfig
    from craft.finetune import add_lora, lora_matrices
    torch.manual_seed(0)
    base = GPT(GPTConfig.from_preset('tiny', mlp='swiglu', bias=True)).eval()
    ours = add_lora(copy.deepcopy(base), rank=4, alpha=8, targets='attn.qkv,mlp')
    theirs = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=['qkv', 'fc', 'mlp.proj']), copy.deepcopy(base))
    with torch.no_grad():
        for name in lora_matrices(base, 'attn.qkv,mlp'):
            mine, peft_layer = ours.get_submodule(name), theirs.get_submodule(name)
            mine.lora_B.normal_(0, 0.2)
            peft_layer.lora_A['default'].weight.copy_(mine.lora_A)
            peft_layer.lora_B['default'].weight.copy_(mine.lora_B)
        ids = torch.randint(0, 65, (2, 16))
        ours_logits, theirs_logits = ours.eval()(ids)[0], theirs.eval()(ids)[0]
    assert torch.allclose(ours_logits, theirs_logits, atol=1e-5)
    assert not torch.allclose(ours_logits, base(ids)[0], atol=1e-3)
