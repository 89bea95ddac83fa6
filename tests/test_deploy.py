"`craft export` and `--quantize int8` from the outside: the CLI in subprocesses, the ONNX file in ONNX Runtime, the example program without torch."
import contextlib, io, os, subprocess, sys

import numpy as np
import pytest
import torch

from craft.errors import CraftError
from craft.model import GPT, GPTConfig
from craft.int8 import Int8Linear, quantize_weights
from craft.rundir import load_checkpoint
from craft.sampling import generate
from craft.widget import sampler_app
from craft.training import train
from craft.deploy import OnnxModel, onnx_errors, onnx_names, validation_loss
from conftest import ENV, built_once, httpx, serve


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    "A run directory with a tiny model trained for a few seconds, with a context of 64 (so that 50 decode steps fit)."
    build = lambda folder: train('tiny', out=folder / 'tiny', block_size=64, max_iters=300, batch_size=32, lr=1e-2,
                                 min_lr=1e-3, eval_interval=300, progress=False, sample_chars=0, device='cpu')
    return built_once(tmp_path_factory, 'deploy', build) / 'tiny'   # trained once per test run: the tests only read it


def craft(*args, timeout=300, env=ENV):
    return subprocess.run([sys.executable, '-m', 'craft.cli', *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(result, *phrases):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
    for phrase in phrases: assert phrase in lines[0], lines[0]


@pytest.fixture(scope='module')
def exported(run_dir, tmp_path_factory):
    "`craft export RUN --format onnx --out DIR/model.onnx`, run once for the module."
    out = tmp_path_factory.mktemp('export') / 'model.onnx'
    r = craft('export', run_dir, '--format', 'onnx', '--out', out)
    assert r.returncode == 0, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and 'craft export: wrote' in r.stderr
    return out


def test_export_writes_the_graph_and_the_program(exported):
    assert sorted(os.listdir(exported.parent)) == ['model.onnx', 'onnx_sample.py']
    runtime = OnnxModel(exported)
    inputs, outputs = onnx_names(2)
    assert [i.name for i in runtime.session.get_inputs()] == inputs and [o.name for o in runtime.session.get_outputs()] == outputs
    assert runtime.session.get_inputs()[0].shape == ['batch', 'seq']
    assert runtime.session.get_inputs()[1].shape == ['batch', 2, 'past', 16]   # the tiny preset: 2 heads of 16
    assert runtime.chars[:3] == '\n !' and runtime.config['block_size'] == 64


def test_onnx_runtime_logits_equal_crafts(run_dir, exported):
    model, _, _ = load_checkpoint(run_dir, 'cpu')
    errors = onnx_errors(model, exported, batch_size=3, prefill=10, steps=50)
    assert errors['decode_steps'] == 50
    assert errors['full_forward'] < 1e-4 and errors['decode'] < 1e-4, errors


def test_export_other_architectures(tmp_path):
    "Rotary positions, RMSNorm, SwiGLU, QK-norm, soft-capped logits, an untied head and biases export as well."
    from craft.deploy import export_onnx
    from craft.tokenizer import CharTokenizer
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset('tiny', block_size=64, pos_emb='rope', norm='rmsnorm', mlp='swiglu', qk_norm=True,
                                      logit_softcap=30.0, tie_weights=False, bias=True)).eval()
    for p in model.parameters(): torch.nn.init.normal_(p, 0.0, 0.1)           # no zero biases or unit gains: all of it counts
    path = export_onnx(model, CharTokenizer([chr(c) for c in range(32, 97)]), tmp_path / 'm.onnx')
    errors = onnx_errors(model, path, steps=50)
    assert errors['full_forward'] < 1e-4 and errors['decode'] < 1e-4, errors


def test_example_program_without_torch_equals_craft_sample(run_dir, exported):
    "The program `craft export` wrote, run where torch and craft cannot be imported, writes `craft sample --temperature 0`'s text."
    settings = ['--prompt', 'ROMEO:', '--max-new-tokens', '200', '--temperature', '0']
    expected = craft('sample', run_dir, *settings, '--device', 'cpu', '--dtype', 'float32', '--quantize', 'none')   # the float model, as exported
    assert expected.returncode == 0, expected.stderr
    argv = ['onnx_sample.py', str(exported), *settings, '--threads', '1']
    code = (f"import sys, runpy; sys.modules['torch'] = sys.modules['craft'] = None; sys.argv = {argv!r}; "
            "runpy.run_path('onnx_sample.py', run_name='__main__')")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=exported.parent, timeout=120, env=ENV)
    assert (r.returncode, r.stderr) == (0, '')
    assert len(r.stdout) == 201 and r.stdout == expected.stdout


def test_example_program_errors_are_one_line(exported, tmp_path):
    import onnx, onnx.helper as h
    value = lambda name: h.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1])
    foreign = h.make_model(h.make_graph([h.make_node('Identity', ['x'], ['y'])], 'g', [value('x')], [value('y')]))
    onnx.save(foreign, tmp_path / 'foreign.onnx')                          # an ONNX file that craft did not write
    script = exported.parent / 'onnx_sample.py'
    for args, phrase in (([tmp_path / 'missing.onnx'], 'error'), ([exported, '--prompt', 'é'], "not in the model's vocabulary"),
                         ([tmp_path / 'foreign.onnx'], 'no craft metadata'), ([exported, '--temperature', '-1'], 'must be >= 0')):
        r = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=60, env=ENV)
        assert_one_line_error(r, 'onnx_sample: error', phrase)


def test_export_bad_input_is_one_line(run_dir, tmp_path):
    assert_one_line_error(craft('export', tmp_path / 'nope', '--out', tmp_path / 'm.onnx'), 'no such file or directory')
    assert_one_line_error(craft('export', run_dir, '--format', 'tflite', '--out', tmp_path / 'm.onnx'), "unknown format 'tflite'", 'onnx')
    (tmp_path / 'file').write_text('')
    assert_one_line_error(craft('export', run_dir, '--out', tmp_path / 'file' / 'm.onnx'), 'cannot write --out')
    assert_one_line_error(craft('export', run_dir, '--out', tmp_path), 'is a directory')
    no_extra = f"import sys; sys.modules['onnxscript'] = None; from craft.cli import main; sys.exit(main(['export', {str(run_dir)!r}, '--out', {str(tmp_path / 'm.onnx')!r}]))"
    r = subprocess.run([sys.executable, '-c', no_extra], capture_output=True, text=True, timeout=120, env=ENV)
    assert_one_line_error(r, 'needs onnxscript', 'pip install -e ".[export]"')
    assert not (tmp_path / 'm.onnx').exists()


def test_sample_quantized(run_dir):
    r = craft('sample', run_dir, '--quantize', 'int8', '--prompt', 'ROMEO:', '--max-new-tokens', '100', '--temperature', '0',
              '--device', 'cpu', '--dtype', 'float32')
    assert r.returncode == 0, r.stderr
    assert 'int8 weights' in r.stderr
    model, tokenizer, _ = load_checkpoint(run_dir, 'cpu', quantize='int8')
    assert isinstance(model.blocks[0].mlp.fc, Int8Linear)
    assert r.stdout == generate(model, tokenizer, 'ROMEO:', max_new_tokens=100, temperature=0)[0] + '\n'


def test_quantize_bad_input_is_one_line(run_dir):
    assert_one_line_error(craft('sample', run_dir, '--quantize', 'int4', '--device', 'cpu'), "unknown quantize='int4'", 'int8')
    with pytest.raises(CraftError, match='CPU only'):              # a model on any device but the CPU
        quantize_weights(GPT(GPTConfig.from_preset('tiny')).to('meta'), 'int8')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_quantize_on_gpu_is_one_line(run_dir):
    assert_one_line_error(craft('sample', run_dir, '--quantize', 'int8', '--device', 'cuda'), 'CPU only', '--device cpu')


def test_int8_loss_stays_close(run_dir):
    "The whole-split validation loss of int8 weights, against float32."
    float_loss = validation_loss(load_checkpoint(run_dir, 'cpu')[0], run_dir)
    int8_loss = validation_loss(load_checkpoint(run_dir, 'cpu', quantize='int8')[0], run_dir)
    assert abs(int8_loss - float_loss) < 0.02


def test_widget_quantized(run_dir):
    app = sampler_app(run_dir, device='cpu', dtype='float32', quantize='int8', prompt='KING', max_new_tokens=50, temperature=0.0)
    assert isinstance(app.model.blocks[0].attn.qkv, Int8Linear)
    model, tokenizer, _ = load_checkpoint(run_dir, 'cpu', quantize='int8')
    assert app.generate() == generate(model, tokenizer, 'KING', max_new_tokens=50, temperature=0)[0]
    with pytest.raises(CraftError, match='pass a run directory'): sampler_app(model, tokenizer, quantize='int8')


def test_serve_quantized(run_dir):
    server = serve(run_dir, quantize='int8')
    try:
        r = httpx.post(f'{server.url}/v1/generate', json=dict(prompt='KING', max_new_tokens=40, temperature=0), timeout=30)
        assert r.status_code == 200, r.text
        model, tokenizer, _ = load_checkpoint(run_dir, 'cpu', quantize='int8')
        assert r.json()['texts'] == generate(model, tokenizer, 'KING', max_new_tokens=40, temperature=0)
    finally: server.stop()
    assert 'Traceback' not in server.log, server.log
