"""Keras-style model summary: one row per layer with output shape and params.

    >>> print(summarize(build_model('cnn'), (32, 32, 3)))
    Model: "CNN"
    ...
     conv1 (Conv)         (None, 32, 32, 16)     208
    ...
    Total params: 528,054

Nothing is computed: the variables and every layer's output shape come from
tracing `model.init` under `jax.eval_shape`, with a Flax method interceptor
recording what each submodule's `__call__` returns. Counting follows Keras:
BatchNorm statistics ('batch_stats', and any collection other than 'params')
are non-trainable and count in the total, as are parameters that the `frozen`
predicate selects. Flax's own `nn.tabulate` compiles the model and prints
nested tables; this is the flat table the course notes show.
"""
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# frozen(path) -> True when the parameter at 'module/.../name' is not trained.
FrozenFn = Callable[[str], bool]
_BATCH = 1  # batch size traced; shown as None


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays (or ShapeDtypeStructs).

  Arguments:
    tree: e.g. variables['params']; a whole variables dict also counts
      'batch_stats'.
  """
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class Row:
  """One layer of the summary.

  Attributes:
    name: module path, e.g. 'conv1' or 'layer1_0/conv1'.
    layer_type: the module's class name, e.g. 'Conv'.
    output_shape: shape of its (first) output, batch axis as None.
    trainable: trainable parameter count.
    non_trainable: frozen parameters plus other collections (BatchNorm stats).
    frozen: parameter count the `frozen` predicate selected (part of non_trainable).
  """
  name: str
  layer_type: str
  output_shape: Optional[Tuple[Optional[int], ...]]
  trainable: int
  non_trainable: int
  frozen: int = 0

  @property
  def params(self) -> int:
    """All variables of the layer, as Keras' 'Param #' column counts them."""
    return self.trainable + self.non_trainable


@dataclasses.dataclass
class Summary:
  """Result of `summarize`; `str(summary)` is the Keras-like table."""
  model_name: str
  rows: List[Row]
  total_params: int
  trainable_params: int
  non_trainable_params: int
  show_trainable: bool = False  # a Trainable column, on when `frozen` was given

  def __str__(self) -> str:
    header = ['Layer (type)', 'Output Shape', 'Param #']
    table = [[f'{r.name} ({r.layer_type})', _shape_str(r.output_shape), f'{r.params:,}']
             for r in self.rows]
    if self.show_trainable:
      header.append('Trainable')
      table = [cells + [_trainable_mark(r)] for cells, r in zip(table, self.rows)]
    widths = [max(len(c) for c in column) + 3 for column in zip(header, *table)]
    line = lambda cells: ' ' + ''.join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    rule = sum(widths) + 1
    out = [f'Model: "{self.model_name}"', '_' * rule, line(header), '=' * rule]
    out += [line(cells) for cells in table]
    out += ['=' * rule,
            f'Total params: {self.total_params:,}',
            f'Trainable params: {self.trainable_params:,}',
            f'Non-trainable params: {self.non_trainable_params:,}',
            '_' * rule]
    return '\n'.join(out)


def _shape_str(shape) -> str:
  if shape is None:
    return '?'
  return '(' + ', '.join('None' if d is None else str(d) for d in shape) + (
      ',)' if len(shape) == 1 else ')')


def _trainable_mark(row: Row) -> str:
  params = row.trainable + row.frozen  # the 'params' collection only
  if params == 0:
    return '-'
  return 'Y' if row.frozen == 0 else ('N' if row.trainable == 0 else 'part')


def _first_shape(out) -> Optional[Tuple[Optional[int], ...]]:
  """Shape of an output, or of its first element for tuples; batch axis -> None."""
  while isinstance(out, (tuple, list)) and out:
    out = out[0]
  if not hasattr(out, 'shape'):
    return None
  shape = tuple(out.shape)
  return (None,) + shape[1:] if shape and shape[0] == _BATCH else shape


def _trace(model: nn.Module, input_shape, input_dtype, call_kwargs):
  """Abstract variables, and (path, class name, output shape) per module call."""
  calls: Dict[Tuple[str, ...], Tuple[str, Any]] = {}  # first call wins, in call order

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    path = tuple(context.module.path)
    first = path not in calls
    if first:  # reserve the slot now so rows keep the order of the calls
      calls[path] = (type(context.module).__name__, None)
    out = next_fun(*args, **kwargs)
    if first:
      calls[path] = (calls[path][0], _first_shape(out))
    return out

  def init(rng, x):
    with nn.intercept_methods(interceptor):
      return model.init({'params': rng, 'dropout': rng}, x, **call_kwargs)

  x = jax.ShapeDtypeStruct((_BATCH,) + tuple(input_shape), input_dtype)
  variables = jax.eval_shape(init, jax.random.key(0), x)
  return variables, calls


def summarize(model: nn.Module, input_shape: Sequence[int], *,
              frozen: Optional[FrozenFn] = None,
              input_dtype: Any = jnp.float32,
              call_kwargs: Optional[Dict[str, Any]] = None) -> Summary:
  """Keras-style summary of `model` on inputs of `input_shape`, without compute.

  Rows are the leaf modules (no submodules: Conv, Dense, BatchNorm, MaxPool,
  Dropout, ...) in call order, plus any module that owns variables directly.

  Arguments:
    model: a Flax module.
    input_shape: one example's shape WITHOUT the batch axis, e.g. (32, 32, 3).
    frozen: optional predicate on parameter paths like 'layer1_0/conv1/kernel';
      selected 'params' count as non-trainable. Default: nothing is frozen.
    input_dtype: dtype of the traced input (int32 for token ids).
    call_kwargs: extra keyword arguments for the model call, e.g. {'train': True}.

  Returns:
    A `Summary`; print it for the table.
  """
  variables, calls = _trace(model, input_shape, input_dtype, call_kwargs or {})
  is_frozen = frozen or (lambda path: False)

  # Flat {(module, ..., name): size} per kind of count.
  trainable, non_trainable, frozen_sizes = {}, {}, {}
  for collection, tree in variables.items():
    for key, leaf in traverse_util.flatten_dict(dict(tree)).items():
      size = count_params(leaf)
      if collection != 'params':
        non_trainable[key] = size
      elif is_frozen('/'.join(key)):
        non_trainable[key] = frozen_sizes[key] = size
      else:
        trainable[key] = size

  paths = list(calls)
  rows = []
  for path, (layer_type, shape) in calls.items():
    n = len(path)
    is_leaf = not any(len(p) > n and p[:n] == path for p in paths)
    # Leaves own everything below them; other modules only their direct variables.
    owns = (lambda k: k[:n] == path) if is_leaf else (
        lambda k: len(k) == n + 1 and k[:n] == path)
    count = lambda sizes: sum(s for k, s in sizes.items() if owns(k))
    row = Row('/'.join(path) or type(model).__name__, layer_type, shape,
              count(trainable), count(non_trainable), count(frozen_sizes))
    if is_leaf or row.params:
      rows.append(row)

  return Summary(
      model_name=type(model).__name__,
      rows=rows,
      total_params=sum(trainable.values()) + sum(non_trainable.values()),
      trainable_params=sum(trainable.values()),
      non_trainable_params=sum(non_trainable.values()),
      show_trainable=frozen is not None)
