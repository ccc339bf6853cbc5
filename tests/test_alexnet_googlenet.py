"""AlexNet and GoogLeNet: torchvision's parameter counts, shapes on ImageNet and
small inputs, cut_at, input-size errors, weight import against PyTorch twins
(tests/torch_twins.py, where torch is installed) and a few training steps.

Counts and shapes come from jax.eval_shape (tracing, no compile); forward
passes use batch 1-4 and, where the test is not about the real widths, the
`width` field's narrow nets.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jdl
from jdl import pretrained
from jdl.errors import CheckpointError, ConfigError
from jdl.models import alexnet, build_model, googlenet
from jdl.summary import summarize

IMAGENET = (224, 224, 3)
CIFAR = (32, 32, 3)
MNIST = (28, 28, 1)


# Parameter arithmetic, written out from torchvision's architectures.
def conv(k, cin, cout, bias=True):
  return k * k * cin * cout + (cout if bias else 0)


def dense(cin, cout):
  return cin * cout + cout


def basic_conv(k, cin, cout):  # GoogLeNet's BasicConv2d: bias-free conv + BatchNorm scale, bias
  return conv(k, cin, cout, bias=False) + 2 * cout


def inception(cin, ch1, ch3r, ch3, ch5r, ch5, pool):
  return (basic_conv(1, cin, ch1) + basic_conv(1, cin, ch3r) + basic_conv(3, ch3r, ch3)
          + basic_conv(1, cin, ch5r) + basic_conv(3, ch5r, ch5) + basic_conv(1, cin, pool))


def aux_head(cin, classes):
  return basic_conv(1, cin, 128) + dense(128 * 4 * 4, 1024) + dense(1024, classes)


def shapes(model, input_shape, train=False, batch=1):
  """(logits, features) shapes of model.init + apply, traced only."""
  def forward(x):
    rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
    variables = model.init(rngs, x, train=False)
    if train:
      return model.apply(variables, x, train=True, rngs=rngs, mutable=['batch_stats'])[0]
    return model.apply(variables, x, train=False)
  return jax.eval_shape(forward, jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32))


def random_variables(model, input_shape, seed=0):
  """Random values for every variable (shapes from eval_shape); variances positive."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, spec in pretrained.target_shapes(model, input_shape).items():
    value = rng.uniform(0.5, 1.5, spec.shape) if path[-1] == 'var' else rng.normal(size=spec.shape)
    flat[path] = value.astype(np.float32)
  return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------- parameter counts


def test_alexnet_matches_torchvision_layer_by_layer():
  expected = [conv(11, 3, 64), conv(5, 64, 192), conv(3, 192, 384), conv(3, 384, 256),
              conv(3, 256, 256), dense(256 * 6 * 6, 4096), dense(4096, 4096), dense(4096, 1000)]
  summary = summarize(build_model('alexnet', stem='imagenet', num_classes=1000), IMAGENET)
  rows = {row.name: row for row in summary.rows}
  layers = ['features_0', 'features_3', 'features_6', 'features_8', 'features_10',
            'classifier_1', 'classifier_4', 'classifier_6']
  assert [rows[name].params for name in layers] == expected
  assert summary.total_params == summary.trainable_params == sum(expected) == 61_100_840
  # Pooling, flatten and dropout are rows too, with their output shapes.
  assert rows['features_2'].output_shape == (None, 27, 27, 64)
  assert rows['features_12'].output_shape == (None, 6, 6, 256)
  assert rows['avgpool'].output_shape == (None, 6, 6, 256)
  assert rows['flatten'].output_shape == (None, 9216)
  assert rows['classifier_0'].layer_type == 'Dropout'
  assert '61,100,840' in str(summary)


@pytest.mark.parametrize('aux_logits, expected', [(False, 6_624_904), (True, 13_004_888)])
def test_googlenet_matches_torchvision(aux_logits, expected):
  model = build_model('googlenet', stem='imagenet', num_classes=1000, aux_logits=aux_logits)
  summary = summarize(model, IMAGENET)
  stem = basic_conv(7, 3, 64) + basic_conv(1, 64, 64) + basic_conv(3, 64, 192)
  modules = sum(inception(*channels) for channels in [
      (192, 64, 96, 128, 16, 32, 32), (256, 128, 128, 192, 32, 96, 64),
      (480, 192, 96, 208, 16, 48, 64), (512, 160, 112, 224, 24, 64, 64),
      (512, 128, 128, 256, 24, 64, 64), (512, 112, 144, 288, 32, 64, 64),
      (528, 256, 160, 320, 32, 128, 128), (832, 256, 160, 320, 32, 128, 128),
      (832, 384, 192, 384, 48, 128, 128)])
  heads = aux_head(512, 1000) + aux_head(528, 1000) if aux_logits else 0
  assert summary.trainable_params == stem + modules + dense(1024, 1000) + heads == expected
  rows = {row.name: row for row in summary.rows}
  # torchvision's "5x5" branch is a 3x3.
  assert rows['inception3a/branch3_1/conv'].params == conv(3, 16, 32, bias=False)
  assert rows['inception3a/branch4_0'].output_shape == (None, 28, 28, 192)  # the pool branch
  assert rows['maxpool4'].output_shape == (None, 7, 7, 832)
  assert rows['fc'].params == dense(1024, 1000)
  assert ('aux1/fc1' in rows) == aux_logits


def test_googlenet_paper_5x5_branch():
  params = pretrained.target_shapes(build_model('googlenet', branch3_kernel=5), CIFAR)
  assert params['params', 'inception3a', 'branch3_1', 'conv', 'kernel'].shape == (5, 5, 16, 32)
  assert params['params', 'inception5b', 'branch2_1', 'conv', 'kernel'].shape == (3, 3, 192, 384)


# ---------------------------------------------------------------- shapes


def test_alexnet_imagenet_shapes():
  logits, features = shapes(build_model('alexnet', stem='imagenet', num_classes=1000), IMAGENET)
  assert logits.shape == (1, 1000) and logits.dtype == jnp.float32
  assert {k: v.shape[1:] for k, v in features.items()} == dict(
      block1=(27, 27, 64), block2=(13, 13, 192), block3=(6, 6, 256), avgpool=(6, 6, 256),
      dense1=(4096,), pre_logits=(4096,))


@pytest.mark.parametrize('name, input_shape, expected', [
    ('alexnet', CIFAR, dict(block1=(8, 8, 64), block2=(4, 4, 192), block3=(2, 2, 256),
                            avgpool=(2, 2, 256), dense1=(4096,), pre_logits=(4096,))),
    ('alexnet', MNIST, dict(block1=(7, 7, 64), block2=(4, 4, 192), block3=(2, 2, 256),
                            avgpool=(2, 2, 256), dense1=(4096,), pre_logits=(4096,))),
    ('googlenet', CIFAR, dict(stem=(16, 16, 192), inception3b=(16, 16, 480),
                              inception4e=(8, 8, 832), inception5b=(4, 4, 1024),
                              pre_logits=(1024,))),
    ('googlenet', MNIST, dict(stem=(14, 14, 192), inception3b=(14, 14, 480),
                              inception4e=(7, 7, 832), inception5b=(4, 4, 1024),
                              pre_logits=(1024,))),
    ('googlenet', IMAGENET, dict(stem=(28, 28, 192), inception3b=(28, 28, 480),
                                 inception4e=(14, 14, 832), inception5b=(7, 7, 1024),
                                 pre_logits=(1024,))),
])
def test_registered_defaults_take_small_inputs(name, input_shape, expected):
  # The registered names are the small-input layouts (--model=alexnet on Fashion-MNIST,
  # CIFAR); googlenet's imagenet stem is checked on 224 here too.
  overrides = dict(stem='imagenet') if input_shape == IMAGENET else {}
  logits, features = shapes(build_model(name, num_classes=7, **overrides), input_shape, batch=2)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  got = {k: v.shape[1:] for k, v in features.items()}
  assert {k: got[k] for k in expected} == expected
  assert all(v.shape[0] == 2 for v in features.values())


def test_shallow_googlenet():
  model = build_model('googlenet', stage_sizes=[1, 2, 1], aux_logits=True, num_classes=5)
  _, features = shapes(model, CIFAR, train=True)
  assert set(features) == {'stem', 'inception3a', 'inception4a', 'inception4b', 'inception5a',
                           'pre_logits', 'aux1_logits'}  # no 4d, so no aux2
  assert features['pre_logits'].shape == (1, 832)
  with pytest.raises(ConfigError, match=r'stage_sizes must be .* \(2, 5, 2\), got \(1, 6, 1\)'):
    build_model('googlenet', stage_sizes=(1, 6, 1))


def test_googlenet_aux_heads_in_train_mode_only():
  model = build_model('googlenet', aux_logits=True, num_classes=5)
  _, features = shapes(model, CIFAR, train=True, batch=3)
  assert features['aux1_logits'].shape == features['aux2_logits'].shape == (3, 5)
  assert features['aux1_logits'].dtype == jnp.float32
  _, features = shapes(model, CIFAR)
  assert 'aux1_logits' not in features
  params = pretrained.target_shapes(model, CIFAR)  # the heads exist in eval-mode init too
  assert ('params', 'aux2', 'fc2', 'kernel') in params


def test_cut_at():
  model = build_model('alexnet', stem='imagenet', cut_at='block2')
  logits, features = shapes(model, IMAGENET)
  assert logits is None and set(features) == {'block1', 'block2'}
  params = pretrained.target_shapes(model, IMAGENET)
  assert not any(path[1] == 'features_6' for path in params)  # nothing after the cut is built

  logits, features = shapes(build_model('googlenet', cut_at='inception4a', aux_logits=True), CIFAR)
  assert logits is None and set(features) == {'stem', 'inception3a', 'inception3b', 'inception4a'}

  with pytest.raises(ConfigError, match="cut_at 'block9' is not a feature of AlexNet.*block3"):
    shapes(build_model('alexnet', cut_at='block9'), CIFAR)
  with pytest.raises(ConfigError, match='inception5b'):
    shapes(build_model('googlenet', cut_at='inception6'), CIFAR)


# ---------------------------------------------------------------- input size errors


@pytest.mark.parametrize('name, stem, too_small, least', [
    ('alexnet', 'imagenet', (32, 32, 3), 63),
    ('alexnet', 'imagenet', (62, 200, 3), 63),
    ('googlenet', 'imagenet', (14, 14, 3), 15),
    ('googlenet', 'cifar', (3, 3, 1), 4),
])
def test_too_small_inputs_are_one_line_errors(name, stem, too_small, least):
  assert {'alexnet': alexnet, 'googlenet': googlenet}[name].min_input_side(stem) == least
  with pytest.raises(ConfigError) as error:
    shapes(build_model(name, stem=stem), too_small)
  message = str(error.value)
  assert '\n' not in message
  assert f"{name} (stem='{stem}') cannot take {'x'.join(map(str, too_small))} inputs" in message
  assert f'at least {least}x{least}' in message
  logits, _ = shapes(build_model(name, stem=stem), (least, least, 3))
  assert logits.shape == (1, 10)


@pytest.mark.parametrize('name, stem, least', [
    ('alexnet', 'imagenet', 63), ('googlenet', 'imagenet', 15), ('googlenet', 'cifar', 4)])
def test_least_input_sides_agree_with_torch(name, stem, least):
  torch = pytest.importorskip('torch')
  import torch_twins
  twin = {'alexnet': torch_twins.AlexNet, 'googlenet': torch_twins.GoogLeNet}[name]
  net = twin(num_classes=3, stem=stem, width=8).eval()
  with torch.no_grad():
    assert net(torch.zeros(1, 3, least, least)).shape == (1, 3)
    with pytest.raises(RuntimeError, match='too small'):
      net(torch.zeros(1, 3, least - 1, least - 1))


def test_bad_fields_are_config_errors():
  for name, overrides in [('alexnet', dict(stem='tiny')), ('googlenet', dict(stem='tiny')),
                          ('googlenet', dict(branch3_kernel=7)), ('alexnet', dict(width=0))]:
    with pytest.raises(ConfigError, match=name):
      build_model(name, **overrides)
  with pytest.raises(ConfigError, match='transform_input needs RGB'):
    shapes(build_model('googlenet', transform_input=True), MNIST)


# ---------------------------------------------------------------- formulas, no torch


def _adaptive_avg_pool_reference(x, out_h, out_w):
  """torch's adaptive average pool, window by window (NumPy, (B, H, W, C))."""
  _, h, w, _ = x.shape
  out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]), np.float64)
  for i in range(out_h):
    for j in range(out_w):
      rows = slice(i * h // out_h, -(-(i + 1) * h // out_h))
      cols = slice(j * w // out_w, -(-(j + 1) * w // out_w))
      out[:, i, j] = x[:, rows, cols].mean(axis=(1, 2))
  return out


@pytest.mark.parametrize('in_hw, out_hw', [((13, 13), (6, 6)), ((12, 6), (6, 6)), ((2, 3), (4, 4)),
                                           ((7, 5), (6, 2)), ((6, 6), (6, 6))])
def test_adaptive_avg_pool_against_numpy(in_hw, out_hw):
  x = np.random.default_rng(0).normal(size=(2, *in_hw, 3)).astype(np.float32)
  got = alexnet.AdaptiveAvgPool(out_hw).apply({}, jnp.asarray(x))
  np.testing.assert_allclose(got, _adaptive_avg_pool_reference(x, *out_hw), rtol=1e-6, atol=1e-6)


def test_flatten_permutation_maps_torch_rows_to_jdl_rows():
  rng = np.random.default_rng(0)
  c, h, w, out = 5, 3, 3, 4
  feature_map = rng.normal(size=(h, w, c))  # one example, jdl's (H, W, C)
  torch_weight = rng.normal(size=(out, c * h * w))  # Linear reading torch's (C, H, W) flatten
  want = torch_weight @ feature_map.transpose(2, 0, 1).reshape(-1)
  kernel = pretrained.chw_rows_to_hwc(torch_weight.T, (c, h, w))  # (H*W*C, out)
  np.testing.assert_allclose(feature_map.reshape(-1) @ kernel, want, rtol=1e-12)
  np.testing.assert_array_equal(pretrained.hwc_rows_to_chw(kernel, (c, h, w)), torch_weight.T)


def test_layouts_round_trip_bit_exact(tmp_path):
  model = build_model('alexnet', stem='imagenet', width=16, num_classes=5)
  variables = random_variables(model, IMAGENET)
  state_dict = pretrained.jdl_to_torch(variables)
  assert sorted(state_dict) == sorted(
      [f'features.{i}.{p}' for i in (0, 3, 6, 8, 10) for p in ('weight', 'bias')]
      + [f'classifier.{i}.{p}' for i in (1, 4, 6) for p in ('weight', 'bias')])
  assert state_dict['features.0.weight'].shape == (16, 3, 11, 11)  # OIHW
  assert state_dict['classifier.1.weight'].shape == (1024, 64 * 6 * 6)  # (out, C*H*W)
  # classifier.1's input rows are permuted, not just transposed: torch column
  # (c, h, w) is jdl row (h, w, c).
  kernel = variables['params']['classifier_1']['kernel']  # (6 * 6 * 64, 1024)
  np.testing.assert_array_equal(state_dict['classifier.1.weight'][7, 5 * 36 + 2 * 6 + 3],
                                kernel[(2 * 6 + 3) * 64 + 5, 7])
  path = tmp_path / 'alexnet.safetensors'
  pretrained.save_safetensors(variables, path)
  loaded = traverse_util.flatten_dict(pretrained.load_torchvision(path, model, IMAGENET))
  for key, value in traverse_util.flatten_dict(variables).items():
    np.testing.assert_array_equal(loaded[key], value, err_msg='/'.join(key))

  model = build_model('googlenet', width=8, aux_logits=True, num_classes=5)
  variables = random_variables(model, CIFAR)
  state_dict = pretrained.jdl_to_torch(variables)
  assert state_dict['inception4b.branch2.1.conv.weight'].shape == (28, 14, 3, 3)
  assert state_dict['inception4b.branch4.1.bn.running_var'].shape == (8,)
  assert state_dict['conv1.bn.num_batches_tracked'].dtype == np.int64
  assert state_dict['aux1.fc1.weight'].shape == (128, 16 * 16)
  loaded = traverse_util.flatten_dict(pretrained.torch_to_jdl(state_dict, model, CIFAR))
  for key, value in traverse_util.flatten_dict(variables).items():
    np.testing.assert_array_equal(loaded[key], value, err_msg='/'.join(key))

  # A file with auxiliary heads into a model without them, or another class count.
  with pytest.raises(CheckpointError, match=r'no place for: aux1\..*aux_logits=True'):
    pretrained.torch_to_jdl(state_dict, build_model('googlenet', width=8, num_classes=5), CIFAR)
  with pytest.raises(CheckpointError, match='the file has 5 classes: .*num_classes=5'):
    pretrained.torch_to_jdl(state_dict, build_model('googlenet', width=8, aux_logits=True), CIFAR)


# ---------------------------------------------------------------- against PyTorch


def _compare(net, model, input_shape, tmp_path, batch=2, train=False):
  """Loads the twin's random weights into `model` via safetensors: the export
  equals them and loads back strictly; equal logits (and auxiliary logits in
  train mode)."""
  torch = pytest.importorskip('torch')
  import safetensors.torch
  import torch_twins

  torch_twins.randomize_batchnorm(net)
  path = tmp_path / 'net.safetensors'
  safetensors.torch.save_file(net.state_dict(), str(path))
  variables = pretrained.load_torchvision(path, model, input_shape)
  exported = {k: torch.from_numpy(v) for k, v in pretrained.jdl_to_torch(variables).items()}
  for key, value in net.state_dict().items():  # before a train-mode forward updates statistics
    np.testing.assert_array_equal(exported[key].numpy(), value.numpy(), err_msg=key)
  net.load_state_dict(exported, strict=True)

  x = np.random.default_rng(1).normal(size=(batch, *input_shape)).astype(np.float32)
  net.train(train)
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))  # NCHW in
  want = [t.numpy() for t in want] if isinstance(want, tuple) else [want.numpy()]
  if train:
    apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[0])
    logits, features = apply(variables, x)
    got = [logits, features['aux2_logits'], features['aux1_logits']]  # torchvision's order
  else:
    got = [jax.jit(lambda v, x: model.apply(v, x, train=False)[0])(variables, x)]
  for g, w in zip(got, want, strict=True):
    assert g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


@pytest.mark.parametrize('width, size, num_classes', [
    (64, 224, 1000),  # torchvision's alexnet: the 6x6 pool is the identity
    (16, 255, 5),  # 7x7 -> 6x6: overlapping windows
    (16, 100, 5),  # 2x2 -> 6x6: pixels repeated
])
def test_alexnet_logits_match_torch(tmp_path, width, size, num_classes):
  pytest.importorskip('torch')
  import torch_twins
  net = torch_twins.AlexNet(num_classes=num_classes, width=width)
  model = build_model('alexnet', stem='imagenet', width=width, num_classes=num_classes)
  _compare(net, model, (size, size, 3), tmp_path, batch=1 if size == 224 else 2)


def test_small_alexnet_logits_match_torch(tmp_path):
  pytest.importorskip('torch')
  import torch_twins
  net = torch_twins.AlexNet(num_classes=10, width=8, stem='cifar')
  _compare(net, build_model('alexnet', width=8), CIFAR, tmp_path)


def test_googlenet_logits_match_torch(tmp_path):
  pytest.importorskip('torch')
  import torch_twins
  # torchvision's full widths, with its auxiliary heads in the file (eval ignores them).
  net = torch_twins.GoogLeNet(num_classes=1000, aux_logits=True)
  model = build_model('googlenet', stem='imagenet', num_classes=1000, aux_logits=True)
  _compare(net, model, (64, 64, 3), tmp_path)


def test_small_googlenet_train_mode_and_transform_input_match_torch(tmp_path):
  pytest.importorskip('torch')
  import torch_twins
  # Train mode: BatchNorm on batch statistics, the auxiliary heads (their flattened
  # (C, H, W) inputs) compared too; no dropout, so both are deterministic.
  net = torch_twins.GoogLeNet(num_classes=5, aux_logits=True, dropout=0.0, dropout_aux=0.0,
                              transform_input=True, stem='cifar', width=16)
  model = build_model('googlenet', num_classes=5, aux_logits=True, dropout=0.0, aux_dropout=0.0,
                      transform_input=True, width=16)
  _compare(net, model, CIFAR, tmp_path, batch=4, train=True)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize('name', ['alexnet', 'googlenet'])
def test_a_few_training_steps(tmp_path, name):
  dataset = jdl.data.load_dataset('shapes', num_train=64, num_test=32)
  config = jdl.config.TrainConfig(dataset='shapes', model=name, epochs=1, num_train=64,
                                  num_test=32, batch_size=32, workdir=str(tmp_path / 'w'),
                                  log_every=1000)
  # Narrow, and for GoogLeNet shallow: its 9 Inception modules' train step compiles in
  # about a minute here, 3 in about 20 s.
  shallow = dict(stage_sizes=(1, 1, 1)) if name == 'googlenet' else {}
  model = build_model(name, width=8, num_classes=dataset.num_classes, **shallow)
  state, results = jdl.train.fit(config, dataset, model=model, progress=False, log=lambda *a: None)
  assert results['steps_run'] >= 1 and np.isfinite(results['test_loss'])
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state.params))
