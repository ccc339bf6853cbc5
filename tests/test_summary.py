"""Keras-style summary: rows, shapes, counts, non-trainable and frozen params."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdl.models import build_model
from jdl.summary import Summary, count_params, summarize

CIFAR = (32, 32, 3)


def row_line(text: str, name: str) -> str:
  """The table line of layer `name`."""
  (line,) = [l for l in text.splitlines() if l.split() and l.split()[0] == name]
  return line


def test_cnn_summary_matches_keras():
  summary = summarize(build_model('cnn'), CIFAR)
  assert isinstance(summary, Summary)
  assert [r.name for r in summary.rows] == [
      'conv1', 'pool1', 'conv2', 'pool2', 'conv3', 'pool3', 'dropout1', 'flatten',
      'dense1', 'dropout2', 'head']
  by_name = {r.name: r for r in summary.rows}
  assert by_name['conv1'].layer_type == 'Conv'
  assert by_name['pool1'].layer_type == 'MaxPool'
  assert by_name['conv1'].output_shape == (None, 32, 32, 16)
  assert by_name['flatten'].output_shape == (None, 1024)
  assert by_name['head'].output_shape == (None, 10)
  assert (summary.total_params, summary.trainable_params,
          summary.non_trainable_params) == (528_054, 528_054, 0)

  text = str(summary)
  # Each count on its own layer's line, Keras formatting.
  for name, count in [('conv1', '208'), ('conv2', '2,080'), ('conv3', '8,256'),
                      ('dense1', '512,500'), ('head', '5,010'), ('pool1', '0')]:
    assert row_line(text, name).split()[-1] == count
  assert '(None, 32, 32, 16)' in row_line(text, 'conv1')
  assert 'Layer (type)' in text and 'Output Shape' in text and 'Param #' in text
  assert 'Total params: 528,054' in text
  assert 'Trainable params: 528,054' in text
  assert 'Non-trainable params: 0' in text
  assert 'Trainable\n' not in text  # no Trainable column unless `frozen` is given


def test_batchnorm_statistics_are_non_trainable():
  model = build_model('resnet20', stage_sizes=(1, 1), widths=(4, 8))
  summary = summarize(model, (8, 8, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  n_params = count_params(variables['params'])
  n_stats = count_params(variables['batch_stats'])
  assert summary.trainable_params == n_params
  assert summary.non_trainable_params == n_stats == 2 * (4 + 4 + 4 + 8 + 8 + 8)
  assert summary.total_params == n_params + n_stats
  assert sum(r.params for r in summary.rows) == summary.total_params
  # A BatchNorm row counts scale, bias, mean and var, as Keras does.
  bn = {r.name: r for r in summary.rows}['layer2_0/downsample_bn']
  assert (bn.layer_type, bn.trainable, bn.non_trainable) == ('BatchNorm', 16, 16)
  assert bn.output_shape == (None, 4, 4, 8)
  assert 'Non-trainable params: 72' in str(summary)


def test_frozen_params_move_to_non_trainable():
  frozen = lambda path: path.startswith(('conv1/', 'conv2/'))
  summary = summarize(build_model('cnn'), CIFAR, frozen=frozen)
  assert summary.non_trainable_params == 208 + 2_080
  assert summary.trainable_params == 528_054 - 208 - 2_080
  assert summary.total_params == 528_054
  rows = {r.name: r for r in summary.rows}
  assert (rows['conv1'].trainable, rows['conv1'].frozen) == (0, 208)
  assert rows['conv3'].frozen == 0
  text = str(summary)
  assert 'Trainable' in text.splitlines()[2]  # header gains the column
  assert row_line(text, 'conv1').split()[-1] == 'N'
  assert row_line(text, 'conv3').split()[-1] == 'Y'
  assert 'Non-trainable params: 2,288' in text


def test_frozen_predicate_sees_full_parameter_paths():
  seen = []
  summarize(build_model('resnet20', stage_sizes=(1,), widths=(4,)), (8, 8, 3),
            frozen=lambda p: seen.append(p) or False)
  assert 'layer1_0/conv1/kernel' in seen and 'fc/bias' in seen
  assert not any(p.endswith('/mean') for p in seen)  # batch_stats are not parameters


class _Pair(nn.Module):
  """A leaf returning a tuple, and owning a parameter directly."""

  @nn.compact
  def __call__(self, x):
    w = self.param('w', nn.initializers.ones, (1, 1, 3))
    return x * w, x.sum()


class _Parent(nn.Module):
  """Owns a parameter directly and has a submodule."""

  @nn.compact
  def __call__(self, x):
    offset = self.param('offset', nn.initializers.zeros, (1, 1, 5))
    y, _ = _Pair(name='pair')(x)
    return nn.Dense(5, name='out')(y) + offset


def test_tuple_outputs_and_parameters_on_non_leaf_modules():
  summary = summarize(_Parent(), (7, 3))
  rows = {r.name: r for r in summary.rows}
  assert rows['pair'].output_shape == (None, 7, 3)  # the first element of the tuple
  assert rows['pair'].params == 3
  assert rows['out'].params == 3 * 5 + 5
  assert rows['_Parent'].params == 5  # the root's own 'offset'
  assert summary.total_params == sum(r.params for r in summary.rows) == 28


def test_count_params_and_call_kwargs():
  tree = {'a': np.zeros((2, 3)), 'b': {'c': jnp.ones(4)}}
  assert count_params(tree) == 10
  assert count_params(jax.eval_shape(lambda: tree)) == 10
  # train=True traces dropout (rng provided) and BatchNorm in training mode.
  model = build_model('vgg', width=4, dropout=0.5)
  summary = summarize(model, CIFAR, call_kwargs={'train': True})
  assert summary.rows[-1].output_shape == (None, 10)
