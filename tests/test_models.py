"""Models: parameter counts from the architecture, shapes, BatchNorm, dropout, dtype.

Parameter counts use jax.eval_shape (tracing only, no compile); forward passes
use small widths and inputs so the file runs in seconds on a 2-core CPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdl.errors import ConfigError
from jdl.models import MODELS, build_model, layers, model_fields
from jdl.summary import count_params

CIFAR = (32, 32, 3)


# Parameter arithmetic, written out from the architectures (not read from the models).
def conv(k, cin, cout, bias=True):
  return k * k * cin * cout + (cout if bias else 0)


def dense(cin, cout, bias=True):
  return cin * cout + (cout if bias else 0)


def bn(c):  # scale + bias; the running mean and var live in batch_stats
  return 2 * c


def abstract_variables(model, shape=CIFAR):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + shape))


def n_params(model, shape=CIFAR):
  return count_params(abstract_variables(model, shape)['params'])


def init(model, x):
  """Variables of the right shapes, filled by NumPy.

  On this CPU, compiling jax.random for each multi-dimensional parameter shape
  costs seconds (threefry), which would dominate the test time; the real
  initializers are still traced by every eval_shape above.
  """
  rng = np.random.RandomState(0)
  def fill(path, leaf):
    name = path[-1].key
    if name in ('scale', 'var'):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name in ('bias', 'mean'):
      return jnp.asarray(0.1 * rng.randn(*leaf.shape), leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.randn(*leaf.shape) / np.sqrt(fan_in), leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, abstract_variables(model, x.shape[1:]))


def jit_apply(model):
  """model.apply, compiled once per (train, mutable): faster than op-by-op here."""
  return jax.jit(model.apply, static_argnames=('train', 'mutable'))


def images(shape, batch=2, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(batch, *shape), jnp.float32)


# ---------------------------------------------------------------- param counts


def test_cnn_param_count_matches_keras():
  expected = [conv(2, 3, 16), conv(2, 16, 32), conv(2, 32, 64),
              dense(4 * 4 * 64, 500), dense(500, 10)]
  assert expected == [208, 2_080, 8_256, 512_500, 5_010]
  params = abstract_variables(build_model('cnn'))['params']
  got = [count_params(params[k]) for k in ('conv1', 'conv2', 'conv3', 'dense1', 'head')]
  assert got == expected
  assert count_params(params) == sum(expected) == 528_054


def test_mlp_param_count():
  expected = dense(32 * 32 * 3, 1000) + dense(1000, 512) + dense(512, 10)
  assert n_params(build_model('mlp')) == expected
  small = build_model('mlp', hidden_sizes=(7,), num_classes=3)
  assert n_params(small, (4, 4, 1)) == dense(16, 7) + dense(7, 3)


@pytest.mark.parametrize('pool', ['max', 'avg'])
def test_lenet5_param_count(pool):
  # 32 -conv5-> 28 -pool-> 14 -conv5-> 10 -pool-> 5.
  expected = (conv(5, 3, 6) + conv(5, 6, 16) + dense(5 * 5 * 16, 120) + dense(120, 84)
              + dense(84, 10))
  assert expected == 62_006
  assert n_params(build_model('lenet5', pool=pool)) == expected


# Standard VGG configs as convs per block; block widths 64, 128, 256, 512, 512.
VGG_CONVS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3),
             19: (2, 2, 4, 4, 4)}


def vgg_counts(depth, width=64, batch_norm=True, num_classes=10):
  params, stats, cin = 0, 0, 3
  for n, mult in zip(VGG_CONVS[depth], (1, 2, 4, 8, 8)):
    for _ in range(n):
      cout = width * mult
      params += conv(3, cin, cout) + (bn(cout) if batch_norm else 0)
      stats += 2 * cout if batch_norm else 0
      cin = cout
  return params + dense(cin, num_classes), stats


@pytest.mark.parametrize('depth', [11, 13, 16, 19])
def test_vgg_param_count(depth):
  variables = abstract_variables(build_model('vgg', depth=depth))
  params, stats = vgg_counts(depth)
  assert count_params(variables['params']) == params
  assert count_params(variables['batch_stats']) == stats
  assert sum(VGG_CONVS[depth]) == depth - 3  # the name counts ImageNet VGG's 3 FC layers


def test_vgg_known_counts_and_variants():
  # kuangliu/pytorch-cifar VGG figures (conv bias kept before BN).
  assert n_params(build_model('vgg11')) == vgg_counts(11)[0] == 9_231_114
  assert n_params(build_model('vgg16')) == vgg_counts(16)[0] == 14_728_266
  plain = build_model('vgg', depth=13, width=8, batch_norm=False, num_classes=5)
  assert n_params(plain) == vgg_counts(13, 8, False, 5)[0]


def resnet_counts(stage_sizes, widths, num_classes, stem='cifar', block='basic'):
  """(params, batch_stats) of a torchvision-layout ResNet, bias-free convs."""
  expansion = 4 if block == 'bottleneck' else 1
  k = 3 if stem == 'cifar' else 7
  params, channels = conv(k, 3, widths[0], bias=False) + bn(widths[0]), [widths[0]]
  cin = widths[0]
  for i, (n, w) in enumerate(zip(stage_sizes, widths)):
    for j in range(n):
      stride = 2 if i > 0 and j == 0 else 1
      cout = w * expansion
      if block == 'basic':
        params += conv(3, cin, w, False) + conv(3, w, w, False) + 2 * bn(w)
        channels += [w, w]
      else:
        params += (conv(1, cin, w, False) + conv(3, w, w, False) + conv(1, w, cout, False)
                   + bn(w) * 2 + bn(cout))
        channels += [w, w, cout]
      if stride != 1 or cin != cout:  # projection shortcut
        params += conv(1, cin, cout, False) + bn(cout)
        channels.append(cout)
      cin = cout
  return params + dense(cin, num_classes), 2 * sum(channels)


def test_resnet20_param_count():
  variables = abstract_variables(build_model('resnet20'))
  params, stats = resnet_counts((3, 3, 3), (16, 32, 64), 10)
  assert count_params(variables['params']) == params == 272_474
  assert count_params(variables['batch_stats']) == stats


def test_resnet18_cifar_param_count():
  variables = abstract_variables(build_model('resnet18'))
  params, stats = resnet_counts((2, 2, 2, 2), (64, 128, 256, 512), 10)
  assert count_params(variables['params']) == params == 11_173_962
  assert count_params(variables['batch_stats']) == stats


def test_resnet18_imagenet_matches_torchvision():
  model = build_model('resnet18', stem='imagenet', num_classes=1000)
  params, _ = resnet_counts((2, 2, 2, 2), (64, 128, 256, 512), 1000, stem='imagenet')
  assert n_params(model) == params == 11_689_512
  p = abstract_variables(model)['params']
  # torchvision names: 'layer2.0.downsample.0.weight' -> layer2_0/downsample_conv/kernel.
  assert p['conv1']['kernel'].shape == (7, 7, 3, 64)
  assert set(p['layer2_0']) == {'conv1', 'bn1', 'conv2', 'bn2', 'downsample_conv',
                                'downsample_bn'}
  assert set(p['layer1_0']) == {'conv1', 'bn1', 'conv2', 'bn2'}
  assert p['fc']['kernel'].shape == (512, 1000)


def test_resnet50_imagenet_matches_torchvision():
  model = build_model('resnet50', stem='imagenet', num_classes=1000)
  params, _ = resnet_counts((3, 4, 6, 3), (64, 128, 256, 512), 1000, 'imagenet',
                            'bottleneck')
  assert n_params(model) == params == 25_557_032


def test_fastnet_param_count():
  # Bias-free convs; BatchNorm learns only its shift (c params, 2c stats).
  expected = conv(2, 3, 24)
  cin = 24
  for w in (64, 256, 256):
    expected += conv(3, cin, w, False) + w + conv(3, w, w, False) + w
    cin = w
  expected += dense(256, 10, bias=False)
  variables = abstract_variables(build_model('fastnet'))
  assert count_params(variables['params']) == expected
  assert count_params(variables['batch_stats']) == 2 * 2 * (64 + 256 + 256)


SEQUENCE_MODELS = {'cnn1d', 'rnn', 'lstm', 'gru'}  # inputs (T, F), e.g. MNIST-1D's (40, 1)


def test_every_registered_model_follows_the_conventions():
  for name in MODELS.names():
    assert {'num_classes', 'dtype', 'activation'} <= model_fields(name), name
    model = build_model(name, num_classes=7)
    shape = (40, 1) if name in SEQUENCE_MODELS else CIFAR
    logits, features = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x)[0], jnp.zeros((1,) + shape))
    assert logits.shape == (1, 7) and logits.dtype == jnp.float32, name
    assert 'pre_logits' in features, name


# ------------------------------------------------------------- forward passes

# (registry name, overrides, one example's shape, feature keys beyond 'pre_logits')
SMALL = [
    ('mlp', dict(hidden_sizes=(16, 8)), (8, 8, 3), ['dense1', 'dense2']),
    ('cnn', dict(filters=(4, 8, 8), dense_size=16), (16, 16, 3), ['block1', 'block3']),
    ('lenet5', dict(pool='avg'), (32, 32, 1), ['block1', 'block2']),
    ('vgg', dict(width=4, depth=11), CIFAR, ['block1', 'block5']),
    ('resnet20', dict(stage_sizes=(1, 1, 1), widths=(4, 8, 8)), (16, 16, 3),
     ['stem', 'layer1', 'layer3']),
    ('resnet18', dict(stage_sizes=(1, 1, 1, 1), widths=(4, 4, 8, 8), stem='imagenet'),
     (32, 32, 3), ['stem', 'layer4']),
    ('resnet50', dict(stage_sizes=(1, 1), widths=(2, 4)), (8, 8, 3), ['layer2']),
    ('fastnet', dict(widths=(4, 8, 8), whiten_width=6), CIFAR, ['stem', 'group3']),
]


@pytest.mark.parametrize('name,overrides,shape,keys', SMALL, ids=[s[0] for s in SMALL])
def test_forward_shapes(name, overrides, shape, keys):
  model = build_model(name, num_classes=5, **overrides)
  x = images(shape)
  logits, features = jit_apply(model)(init(model, x), x)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  assert features['pre_logits'].shape[0] == 2 and features['pre_logits'].ndim == 2
  for key in keys:
    assert key in features and features[key].shape[0] == 2


def test_cnn_feature_shapes():
  model = build_model('cnn')
  _, features = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0],
                               jnp.zeros((2,) + CIFAR))
  assert features['block1'].shape == (2, 16, 16, 16)
  assert features['block3'].shape == (2, 4, 4, 64)
  assert features['pre_logits'].shape == (2, 500)


def test_resnet_stem_shapes():
  for stem, side in [('cifar', 32), ('imagenet', 8)]:
    model = build_model('resnet18', stem=stem, widths=(4, 4, 8, 8))
    _, features = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x)[0], jnp.zeros((1,) + CIFAR))
    assert features['stem'].shape == (1, side, side, 4)
    assert features['layer4'].shape == (1, side // 8, side // 8, 8)


def test_batchnorm_train_updates_stats_and_eval_uses_them():
  model = build_model('resnet20', stage_sizes=(1, 1), widths=(4, 8))
  x = images((8, 8, 3), batch=4) * 3.0 + 1.0
  variables = init(model, x)
  params, stats = variables['params'], variables['batch_stats']
  apply = jit_apply(model)

  # Train: batch statistics, running averages move toward them.
  (logits_train, _), updates = apply(variables, x, train=True, mutable='batch_stats')
  new_stats = updates['batch_stats']
  assert not np.allclose(new_stats['bn1']['mean'], stats['bn1']['mean'])
  # Train mode normalizes with the batch: an example's logits depend on its batch.
  (alone, _), _ = apply(variables, x[:2], train=True, mutable='batch_stats')
  assert not np.allclose(alone, logits_train[:2], atol=1e-5)

  # Eval: deterministic, independent of the batch, and driven by the running stats.
  eval_vars = {'params': params, 'batch_stats': new_stats}
  a, _ = apply(eval_vars, x)
  b, _ = apply(eval_vars, x)
  part, _ = apply(eval_vars, x[:2])
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(part, a[:2], rtol=1e-5, atol=1e-6)
  old, _ = apply(variables, x)
  assert not np.allclose(old, a, atol=1e-5)


def test_dropout_only_in_train():
  model = build_model('mlp', hidden_sizes=(64,), dropout=0.5)
  x = images((4, 4, 2))
  variables = init(model, x)
  apply = jit_apply(model)
  eval1, _ = apply(variables, x)
  eval2, _ = apply(variables, x, train=False)
  np.testing.assert_array_equal(eval1, eval2)
  t1, _ = apply(variables, x, train=True, rngs={'dropout': jax.random.key(1)})
  t2, _ = apply(variables, x, train=True, rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(t1, t2) and not np.allclose(t1, eval1)
  with pytest.raises(Exception):  # train mode without a 'dropout' rng
    model.apply(variables, x, train=True)


@pytest.mark.parametrize('name,overrides,shape,key', [
    ('cnn', dict(filters=(4, 4, 4), dense_size=8), (8, 8, 3), 'block2'),
    ('resnet20', dict(stage_sizes=(1, 1), widths=(4, 8)), (8, 8, 3), 'stem'),
])
def test_bfloat16_compute(name, overrides, shape, key):
  model = build_model(name, dtype=jnp.bfloat16, **overrides)
  x = images(shape)
  variables = init(model, x)
  # Parameters (and BatchNorm statistics) stay float32; only compute is bf16.
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  (logits, features), _ = jit_apply(model)(variables, x, train=True, mutable='batch_stats',
                                           rngs={'dropout': jax.random.key(1)})
  assert logits.dtype == jnp.float32
  assert features[key].dtype == jnp.bfloat16
  assert features['pre_logits'].dtype == jnp.bfloat16


def test_activation_is_configurable():
  x = images((4, 4, 1))
  outs = []
  for act in ('relu', 'tanh'):
    model = build_model('mlp', hidden_sizes=(8,), activation=act)
    outs.append(jit_apply(model)(init(model, x), x)[0])
  assert not np.allclose(outs[0], outs[1])


# ---------------------------------------------------------- registry / errors


def test_unknown_model_lists_names():
  with pytest.raises(ConfigError, match="unknown model 'resnet99'") as e:
    build_model('resnet99')
  assert 'resnet18' in str(e.value) and 'cnn' in str(e.value)
  assert '\n' not in str(e.value)


def test_unknown_field_lists_fields():
  with pytest.raises(ConfigError, match="model 'resnet20' has no field 'dropout'") as e:
    build_model('resnet20', dropout=0.1)
  assert 'num_classes' in str(e.value) and 'stem' in str(e.value)
  assert 'parent' not in str(e.value)


@pytest.mark.parametrize('name,overrides', [
    ('vgg', dict(depth=12)), ('lenet5', dict(pool='median')),
    ('resnet18', dict(stem='tiny')), ('resnet18', dict(block='wide')),
    ('resnet20', dict(widths=(16, 32))),
])
def test_bad_values_are_config_errors(name, overrides):
  with pytest.raises(ConfigError):
    build_model(name, **overrides)


def test_model_fields_and_list_overrides():
  assert model_fields('cnn') == {'filters', 'kernel_size', 'dense_size', 'num_classes',
                                 'activation', 'dropout', 'head_dropout', 'dtype', 'cut_at',
                                 'conv', 'max_pool'}  # the layers jdl.ops may stand in for
  assert 'depth' in model_fields('vgg16')
  model = build_model('mlp', hidden_sizes=[8, 4])  # a list from a config file
  assert model.hidden_sizes == (8, 4)
  hash(model)


# ------------------------------------------------------------------- layers


def test_maxpool_torch_padding_against_numpy():
  x = np.arange(2 * 5 * 5 * 3, dtype=np.float32).reshape(2, 5, 5, 3) * -1.0  # all <= 0
  out = layers.MaxPool(3, 2, ((1, 1), (1, 1))).apply({}, jnp.asarray(x))
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  ref = np.stack([np.stack([padded[:, i:i + 3, j:j + 3].max(axis=(1, 2))
                            for j in range(0, 5, 2)], 1) for i in range(0, 5, 2)], 1)
  np.testing.assert_array_equal(out, ref)  # -inf padding: zeros never win


def test_small_layers():
  x = jnp.asarray(np.random.RandomState(0).randn(2, 4, 6, 3).astype(np.float32))
  np.testing.assert_allclose(layers.AvgPool(2).apply({}, x),
                             x.reshape(2, 2, 2, 3, 2, 3).mean(axis=(2, 4)), rtol=1e-6)
  np.testing.assert_allclose(layers.GlobalAvgPool().apply({}, x), x.mean(axis=(1, 2)),
                             rtol=1e-6)
  np.testing.assert_array_equal(layers.GlobalMaxPool().apply({}, x), x.max(axis=(1, 2)))
  assert layers.Flatten().apply({}, x).shape == (2, 72)


def test_real_initializers_run():
  # Everything else fills parameters with NumPy (see `init`); run Flax's init once.
  model = build_model('mlp', hidden_sizes=(8,), num_classes=3)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 2, 2, 1)))
  kernel = variables['params']['dense1']['kernel']
  assert kernel.shape == (4, 8) and np.all(np.isfinite(kernel)) and np.std(kernel) > 0
