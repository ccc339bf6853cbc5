"""The PyTorch twins in jdl/torch_reference.py: same architecture as jdl's, steps that train."""
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from jdl.models import build_model  # noqa: E402
from jdl.models.cnn import CNN  # noqa: E402
from jdl.models.decoder import Discriminator, Generator  # noqa: E402
from jdl.models.rnn import RNNClassifier  # noqa: E402
from jdl.pretrained import convert_torch_state_dict  # noqa: E402
from jdl.summary import count_params  # noqa: E402
from jdl import torch_reference as tr  # noqa: E402

LSTM_KWARGS = dict(cell='lstm', hidden_size=128, num_layers=1, num_classes=10)


def _jdl_variables(module, shape):
  """Shapes only (no compilation) of module.init on zeros of `shape`."""
  return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _jdl_param_count(name):
  if name == 'cnn':
    return count_params(_jdl_variables(CNN(), (1, 32, 32, 3))['params'])
  if name == 'lstm':
    return count_params(_jdl_variables(RNNClassifier(**LSTM_KWARGS), (1, 40, 32))['params'])
  if name in ('fastnet', 'resnet18'):
    return count_params(_jdl_variables(build_model(name), (1, 32, 32, 3))['params'])
  g = _jdl_variables(Generator((32, 32, 3), 128), (1, 100))
  d = _jdl_variables(Discriminator(32), (1, 32, 32, 3))
  return count_params(g['params']) + count_params(d['params'])


@pytest.mark.parametrize("name, expected", [("cnn", 528_054), ("lstm", 84_234), ("dcgan", 538_468),
                                            ("fastnet", 1_971_640), ("resnet18", 11_173_962)])
def test_param_counts_equal_jdl(name, expected):
  jdl_count = _jdl_param_count(name)
  assert tr.count_params(name) == jdl_count
  if expected is not None:
    assert jdl_count == expected


def test_dcgan_batch_norm_buffers_equal_jdl_batch_stats():
  models = tr.make_models('dcgan')
  for key, module, shape in (('g', Generator((32, 32, 3), 128), (1, 100)),
                             ('d', Discriminator(32), (1, 32, 32, 3))):
    stats = count_params(_jdl_variables(module, shape)['batch_stats'])
    buffers = sum(b.numel() for n, b in models[key].named_buffers()
                  if n.endswith(('running_mean', 'running_var')))
    assert buffers == stats


@pytest.mark.parametrize("name", ["fastnet", "resnet18"])
def test_batch_norm_buffers_equal_jdl_batch_stats(name):
  stats = count_params(_jdl_variables(build_model(name), (1, 32, 32, 3))['batch_stats'])
  buffers = sum(b.numel() for n, b in tr.make_models(name)['model'].named_buffers()
                if n.endswith(('running_mean', 'running_var')))
  assert buffers == stats


def test_unknown_name_lists_known():
  with pytest.raises(ValueError, match="cnn, lstm, dcgan"):
    tr.count_params('vgg')


@pytest.mark.parametrize("name", tr.NAMES)
def test_step_trains(name):
  torch.manual_seed(0)
  step = tr.build(name, batch_size=8)
  before = {k: [p.detach().clone() for p in m.parameters()] for k, m in step.modules.items()}
  for _ in range(3):
    step()
  assert step.losses
  for loss in step.losses.values():
    assert math.isfinite(float(loss))
  for key, module in step.modules.items():  # every network (G and D too) was updated
    changed = [not torch.equal(a, b) for a, b in zip(before[key], module.parameters())]
    trainable = [p.requires_grad for p in module.parameters()]
    assert changed == trainable, (key, changed)  # frozen ones (FastNet's BN scales) stay


def test_dcgan_generator_pass_leaves_discriminator_running_stats():
  step = tr.build('dcgan', batch_size=8)
  d = step.modules['d']
  bn = next(m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d))
  step()
  # Only D's own update (two batches) moved the running mean: 2 counts, not 3.
  assert int(bn.num_batches_tracked) == 2
  assert bn.track_running_stats


def test_channels_last_and_autocast_steps_run():
  step = tr.build('cnn', batch_size=4, channels_last=True, autocast_bf16=True)
  step()
  step()
  assert math.isfinite(float(step.losses['loss']))
  step = tr.build('dcgan', batch_size=4, channels_last=True)
  step()
  assert all(math.isfinite(float(v)) for v in step.losses.values())


@pytest.mark.skipif(not (shutil.which('g++') or shutil.which('c++')),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_global_max_pool_gradient_is_finite_under_compile_and_bf16_autocast():
  """The GPU benchmark's fair-best PyTorch side compiles under bf16 autocast;
  there `torch.amax`'s backward gave NaN gradients (see `global_max_pool`)."""
  torch.manual_seed(0)
  conv = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False)
  x = torch.randn(4, 8, 6, 6)
  pooled = lambda x: tr.global_max_pool(F.gelu(conv(x)))
  with torch.autocast('cpu', dtype=torch.bfloat16):
    out = torch.compile(pooled)(x)
  out.float().sum().backward()
  compiled = conv.weight.grad.clone()
  conv.weight.grad = None
  pooled(x).sum().backward()  # eager, float32
  assert torch.isfinite(compiled).all()
  torch.testing.assert_close(compiled, conv.weight.grad, atol=0.05 * float(conv.weight.grad.abs().max()),
                             rtol=0)
  y = torch.randn(2, 3, 4, 5)
  torch.testing.assert_close(tr.global_max_pool(y), torch.amax(y, dim=(2, 3)), atol=0, rtol=0)


def test_lstm_logits_equal_jdl():
  torch.manual_seed(0)
  model = tr.LSTMClassifier().eval()
  x = np.random.default_rng(0).standard_normal((4, 40, 32)).astype(np.float32)  # (B, T, F)
  params = {'rnn': convert_torch_state_dict(model.rnn.state_dict(), 'lstm', 1, False),
            'head': {'kernel': model.head.weight.detach().numpy().T,
                     'bias': model.head.bias.detach().numpy()}}
  logits, _ = RNNClassifier(**LSTM_KWARGS).apply({'params': params}, x)
  with torch.no_grad():
    expected = model(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)


def test_cnn_logits_equal_jdl():
  torch.manual_seed(0)
  model = tr.CNN().eval()
  x = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)  # (B, H, W, C)
  logits, _ = CNN().apply({'params': tr.cnn_params_to_jdl(model)}, x)
  with torch.no_grad():
    expected = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()  # NCHW in
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)


def test_fastnet_logits_equal_jdl():
  """The twin computes jdl's FastNet (eval mode, random BN shifts and statistics)."""
  torch.manual_seed(0)
  model = tr.FastNet().eval()
  with torch.no_grad():
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
      bn.bias.normal_()
      bn.running_mean.normal_()
      bn.running_var.uniform_(0.5, 2.0)
  numpy = lambda t: t.detach().numpy()
  hwio = lambda conv: numpy(conv.weight.permute(2, 3, 1, 0))  # (O, I, kh, kw) -> (kh, kw, I, O)
  params = {'whiten': {'kernel': hwio(model.whiten), 'bias': numpy(model.whiten.bias)},
            'head': {'kernel': numpy(model.head.weight.t())}}
  stats = {}
  groups = list(model.groups)  # 7 modules per group: conv, pool, bn, gelu, conv, bn, gelu
  for g in range(3):
    conv1, _, bn1, _, conv2, bn2, _ = groups[7 * g:7 * g + 7]
    params[f'group{g + 1}'] = {'conv1': {'kernel': hwio(conv1)}, 'conv2': {'kernel': hwio(conv2)},
                               'bn1': {'bias': numpy(bn1.bias)}, 'bn2': {'bias': numpy(bn2.bias)}}
    stats[f'group{g + 1}'] = {name: {'mean': numpy(bn.running_mean), 'var': numpy(bn.running_var)}
                              for name, bn in (('bn1', bn1), ('bn2', bn2))}
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  logits, features = jax.jit(build_model('fastnet').apply)(
      {'params': params, 'batch_stats': stats}, x)
  with torch.no_grad():
    torch_x = torch.from_numpy(x).permute(0, 3, 1, 2)
    pooled = torch.amax(model.groups(torch.nn.functional.gelu(model.whiten(torch_x))), dim=(2, 3))
    expected = model(torch_x).numpy()
  # Tolerances relative to each output's scale (the logits are ~1e-4 here).
  for got, want in ((features['pre_logits'], pooled.numpy()), (logits, expected)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
