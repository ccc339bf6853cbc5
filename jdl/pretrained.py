"""PyTorch weights in jdl: torchvision-layout ResNets, AlexNet and GoogLeNet via
safetensors, and torch.nn.LSTM / GRU / RNN state dicts (`convert_torch_state_dict`).

jdl reads only `.safetensors` files: they hold raw tensors and a JSON header, so
loading one runs no code. It never loads pickle / `torch.save` files (`.pt`,
`.pth`, `.bin`), which can run arbitrary code when opened. Convert one once, in
PyTorch, with a source you trust:

    import safetensors.torch, torchvision
    model = torchvision.models.resnet18(weights='IMAGENET1K_V1')
    safetensors.torch.save_file(model.state_dict(), 'resnet18.safetensors')

Then in jdl:

    import jdl
    from jdl import pretrained
    model = jdl.build_model('resnet18', stem='imagenet', num_classes=1000)
    variables = pretrained.load_resnet('resnet18.safetensors', model, (224, 224, 3))
    logits, features = model.apply(variables, images, train=False)  # images (B, 224, 224, 3)

and back: `pretrained.save_safetensors(variables, 'mine.safetensors')` writes
torchvision's names and layouts, loadable with `load_state_dict(strict=True)`.
AlexNet and GoogLeNet load the same way (`load_torchvision`, of which
`load_resnet` is another name): build_model('alexnet', stem='imagenet',
num_classes=1000), or 'googlenet' (with aux_logits=True for a file that has
torchvision's auxiliary heads, transform_input=True for its pretrained weights).

Names: jdl's modules are torchvision's with '_' for '.', so the mapping is
mechanical: 'layer1.0.conv1.weight' <-> params/layer1_0/conv1/kernel,
'features.3.weight' <-> params/features_3/kernel (AlexNet),
'inception4b.branch2.1.bn.running_var' <-> batch_stats/inception4b/branch2_1/bn/var
(GoogLeNet); the one exception is the ResNet shortcut, 'layer2.0.downsample.0' /
'.1' <-> 'layer2_0/downsample_conv' / 'downsample_bn'. BatchNorm weight / bias /
running_mean / running_var <-> params scale / bias, batch_stats mean / var.
Layouts: conv weights are OIHW in torch and HWIO in jdl, Linear weights (out, in)
in torch and (in, out) in jdl. A Linear that reads a flattened feature map
(AlexNet's classifier.1, GoogLeNet's aux*.fc1) sees it in (C, H, W) order in
torch and (H, W, C) in jdl, so its input rows are permuted as well
(`FLATTENED_INPUTS`). torch's '*.num_batches_tracked' counters have no jdl
counterpart: they are ignored on load and written as 0 on save.
"""
import functools
import math
import os
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util

from jdl.errors import CheckpointError, ConfigError
from jdl.models.rnn import GATES, _check_cell

SUFFIX = '.safetensors'
CONVERT_HINT = ("convert it once in PyTorch, from a source you trust: "
                "safetensors.torch.save_file(model.state_dict(), 'x.safetensors')")

# (collection, jdl leaf name) -> torch parameter or buffer name.
LEAF_NAMES = {
    ('params', 'kernel'): 'weight',  # Conv / Dense
    ('params', 'scale'): 'weight',  # BatchNorm
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}
# jdl module names that torchvision spells differently (the shortcut of a block).
MODULE_NAMES = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}
COUNTER = 'num_batches_tracked'  # a torch BatchNorm buffer with no jdl counterpart
# torchvision Linear layers fed a flattened (C, H, W) map, and the conv whose
# output channels are that C (the pooled map is square: H = W = sqrt(in / C)).
FLATTENED_INPUTS = {
    'classifier.1': 'features.10',  # AlexNet: 256 x 6 x 6 after its adaptive pool
    'aux1.fc1': 'aux1.conv.conv',  # GoogLeNet's auxiliary heads: 128 x 4 x 4
    'aux2.fc1': 'aux2.conv.conv',
}
# Keys whose first axis is the class count, and first convs (which tell the stem): error hints.
HEAD_KEYS = ('fc.weight', 'fc.bias', 'classifier.6.weight', 'classifier.6.bias',
             'aux1.fc2.weight', 'aux1.fc2.bias', 'aux2.fc2.weight', 'aux2.fc2.bias')
FIRST_CONVS = ('conv1.weight', 'conv1.conv.weight', 'features.0.weight')
MAX_LISTED = 5  # unexpected keys named in an error


# ------------------------------------------------------------------ names and layouts


def torch_name(path: Tuple[str, ...]) -> str:
  """Returns the torch state-dict key of the jdl leaf at `path`.

  Arguments:
    path: (collection, module, ..., leaf), e.g. ('params', 'layer2_0',
      'downsample_conv', 'kernel') -> 'layer2.0.downsample.0.weight'.

  Raises:
    CheckpointError: a leaf that torchvision's layout has no name for.
  """
  collection, *modules, leaf = path
  if (collection, leaf) not in LEAF_NAMES:
    raise CheckpointError(f'{"/".join(path)} has no torchvision name: jdl maps only conv, '
                          f'Dense and BatchNorm variables of a ResNet, AlexNet or GoogLeNet')
  # 'layer1_0' -> 'layer1.0', 'features_3' -> 'features.3': Sequential / ModuleList indices.
  parts = [MODULE_NAMES.get(m, m.replace('_', '.')) for m in modules]
  return '.'.join(parts + [LEAF_NAMES[(collection, leaf)]])


def _to_jdl_layout(value: np.ndarray) -> Tuple[np.ndarray, str]:
  """Torch array -> (jdl array, how it was rearranged, for error messages)."""
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0), ' = {} after OIHW -> HWIO'  # (O, I, H, W) -> (H, W, I, O)
  if value.ndim == 2:
    return value.T, ' = {} after transposing'  # Linear (out, in) -> Dense (in, out)
  return value, ''


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)  # (H, W, I, O) -> (O, I, H, W)
  if value.ndim == 2:
    return value.T  # (in, out) -> (out, in)
  return value


def _flattened_map(key: str, kernel_shape, channels: int) -> Tuple[int, int, int]:
  """(C, H, W) of the square map that `key`'s (in, out) kernel reads flattened."""
  side = math.isqrt(kernel_shape[0] // channels)
  if side * side * channels != kernel_shape[0]:
    raise CheckpointError(f'{key} takes {kernel_shape[0]} inputs, not a square map of '
                          f'{channels} channels (C x H x W) as torchvision\'s does')
  return channels, side, side


def chw_rows_to_hwc(kernel: np.ndarray, chw: Tuple[int, int, int]) -> np.ndarray:
  """A Dense kernel (C*H*W, out) whose rows follow torch's (C, H, W) flatten ->
  the same kernel for jdl's (H, W, C) flatten: row (h, w, c) = old row (c, h, w)."""
  (c, h, w), out = chw, kernel.shape[1]
  return kernel.reshape(c, h, w, out).transpose(1, 2, 0, 3).reshape(h * w * c, out)


def hwc_rows_to_chw(kernel: np.ndarray, chw: Tuple[int, int, int]) -> np.ndarray:
  """The inverse of `chw_rows_to_hwc`: jdl's (H*W*C, out) -> torch's row order."""
  (c, h, w), out = chw, kernel.shape[1]
  return kernel.reshape(h, w, c, out).transpose(2, 0, 1, 3).reshape(c * h * w, out)


def _permute_flattened(flat, names, permute) -> None:
  """Applies `permute(kernel, (C, H, W))` in place to the Dense kernels of `flat`
  ({path: jdl-layout array}, torch names in `names`) that FLATTENED_INPUTS lists."""
  paths = {key: path for path, key in names.items()}
  for layer, source in FLATTENED_INPUTS.items():
    weight, source_weight = layer + '.weight', source + '.weight'
    if weight in paths and source_weight in paths:
      path = paths[weight]
      chw = _flattened_map(weight, flat[path].shape, flat[paths[source_weight]].shape[-1])
      flat[path] = np.ascontiguousarray(permute(flat[path], chw))


# ------------------------------------------------------------------ files


def load_safetensors(path) -> Dict[str, np.ndarray]:
  """Reads a `.safetensors` file into {name: numpy array}; never unpickles.

  Arguments:
    path: a file whose name ends with '.safetensors'.

  Raises:
    CheckpointError: a missing file, another suffix (pickle / torch.save files
      are refused, with how to convert them), or bytes that are not safetensors.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f'no such weights file: {path}')
  if not path.endswith(SUFFIX):
    raise CheckpointError(f'{path}: jdl reads only {SUFFIX} weights and never loads pickle / '
                          f'torch.save files (.pt, .pth, .bin), which can run code when opened; '
                          f'{CONVERT_HINT}')
  try:
    return safetensors.numpy.load_file(path)
  except safetensors.SafetensorError as e:
    raise CheckpointError(f'{path} is not a valid safetensors file ({e}){_sniff(path)}') from None
  except TypeError as e:  # a dtype numpy lacks (bfloat16 reads once jax has registered it)
    raise CheckpointError(f'{path}: numpy cannot read its tensors ({e}); save them as float32 in '
                          f'PyTorch: {{k: v.float() for k, v in state_dict.items()}}') from None
  except OSError as e:
    raise CheckpointError(f'cannot read {path}: {e}') from None


def _sniff(path: str) -> str:
  """A hint from the first bytes of a file that failed to parse (reads, never loads)."""
  with open(path, 'rb') as f:
    head = f.read(2)
  if head.startswith(b'PK') or head[:1] == b'\x80':  # zip (torch.save) / pickle protocol 2+
    return (f'; it looks like a torch.save / pickle file renamed, which jdl never loads: '
            f'{CONVERT_HINT}')
  return ''


def save_safetensors(variables: Dict[str, Any], path) -> None:
  """Writes jdl variables as a torchvision-layout `.safetensors` file.

  Arguments:
    variables: {'params': ..., 'batch_stats': ...} of a jdl ResNet, AlexNet or
      GoogLeNet.
    path: output file; its name must end with '.safetensors'.

  Raises:
    CheckpointError: another suffix, or the file cannot be written.
  """
  path = os.fspath(path)
  if not path.endswith(SUFFIX):
    raise CheckpointError(f'{path}: weights files must end with {SUFFIX}, the only kind jdl reads')
  tensors = {k: np.ascontiguousarray(v) for k, v in jdl_to_torch(variables).items()}
  try:
    safetensors.numpy.save_file(tensors, path)
  except (safetensors.SafetensorError, OSError) as e:
    raise CheckpointError(f'cannot write {path}: {e}') from None


# ------------------------------------------------------------------ conversion


def target_shapes(model, input_shape=(224, 224, 3)) -> Dict[Tuple[str, ...], jax.ShapeDtypeStruct]:
  """{(collection, module, ..., leaf): shape and dtype} of model.init, without computing.

  Arguments:
    model: a jdl model called as model(x, train=...).
    input_shape: one example's (H, W, C); the variables of a ResNet, AlexNet or
      GoogLeNet do not depend on H, W (it must only be large enough for the model).
  """
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  init = functools.partial(model.init, train=False)
  return traverse_util.flatten_dict(jax.eval_shape(init, jax.random.key(0), x))


def torch_to_jdl(state_dict: Dict[str, Any], model, input_shape=(224, 224, 3)) -> Dict[str, Any]:
  """Maps a torchvision-layout state dict onto `model`'s variables.

  Works for jdl ResNets (basic or bottleneck blocks, 'cifar' or 'imagenet'
  stem), AlexNets and GoogLeNets (either stem, with or without auxiliary
  heads), whose torch twins use torchvision's module names. Every jdl variable
  must come from the file and every file tensor but '*.num_batches_tracked'
  must be used, so a different depth, stem, head or class count is an error,
  not a half-load.

  Arguments:
    state_dict: {torch name: array}, e.g. from `load_safetensors`; numpy arrays,
      or anything np.asarray takes (torch CPU tensors too).
    model: the jdl model to load into, e.g. build_model('resnet18', stem='imagenet',
      num_classes=1000) or build_model('alexnet', stem='imagenet', num_classes=1000).
    input_shape: one example's (H, W, C), used only to trace model.init.

  Returns:
    {'params': ..., 'batch_stats': ...}: nested dicts of float32 numpy arrays,
    for model.apply(variables, x, train=False).

  Raises:
    CheckpointError: a missing key, a shape that does not fit (both shapes are
      named), a non-float tensor, or keys the model has no place for.
  """
  targets = target_shapes(model, input_shape)
  names = {path: torch_name(path) for path in targets}

  # Missing keys first: a wrong architecture reads best as the first absent name.
  for path, key in names.items():
    if key not in state_dict:
      hint = ''
      if f'module.{key}' in state_dict:
        hint = " (the file's keys start with 'module.', as nn.DataParallel saves them: strip it)"
      raise CheckpointError(f'state dict has no {key} for {"/".join(path)}{hint}')

  # Weights before biases and statistics: a kernel's two shapes tell the most.
  flat = {}
  for path, key in sorted(names.items(), key=lambda item: item[0][-1] != 'kernel'):
    value = np.asarray(state_dict[key])
    if not jnp.issubdtype(value.dtype, jnp.floating):  # jnp's knows bfloat16, np's does not
      raise CheckpointError(f'{key} has dtype {value.dtype}; expected floating point')
    converted, how = _to_jdl_layout(value)
    want = targets[path].shape
    if converted.shape != want:
      rearranged = how.format(converted.shape)
      raise CheckpointError(f'{key} -> {"/".join(path)}: file has {value.shape}{rearranged}, '
                            f'model wants {want}{_shape_hint(key, value.shape)}')
    flat[path] = np.ascontiguousarray(converted, dtype=targets[path].dtype)

  # Linear layers after a Flatten: torch's (C, H, W) input rows -> jdl's (H, W, C).
  _permute_flattened(flat, names, chw_rows_to_hwc)

  used = set(names.values())
  extra = sorted(k for k in state_dict if k not in used and not k.endswith('.' + COUNTER))
  if extra:
    listed = ', '.join(extra[:MAX_LISTED])
    if len(extra) > MAX_LISTED:
      listed += f', ... ({len(extra)} in all)'
    hint = ("GoogLeNet's auxiliary heads: build it with aux_logits=True"
            if extra[0].startswith('aux') else 'a deeper network, or other blocks?')
    raise CheckpointError(f'state dict has keys the model has no place for: {listed} ({hint})')
  return traverse_util.unflatten_dict({path: flat[path] for path in targets})  # init order


def _shape_hint(key: str, file_shape) -> str:
  if key in HEAD_KEYS:
    classes = file_shape[0]
    return f' (the file has {classes} classes: build the model with num_classes={classes})'
  if key in FIRST_CONVS and len(file_shape) == 4:
    # ResNet and GoogLeNet: 7x7 / 3x3; AlexNet: 11x11 / 3x3.
    stem = {7: 'imagenet', 11: 'imagenet', 3: 'cifar'}.get(file_shape[-1])
    if stem:
      return f' (a {file_shape[-1]}x{file_shape[-1]} first conv is stem={stem!r})'
  return ''


def jdl_to_torch(variables: Dict[str, Any]) -> Dict[str, np.ndarray]:
  """Maps jdl variables to a torchvision-layout state dict (the inverse).

  Every BatchNorm also gets torch's 'num_batches_tracked' counter (int64 0), so
  the dict loads into a torchvision model with strict=True.

  Arguments:
    variables: {'params': ..., 'batch_stats': ...} of a jdl ResNet, AlexNet or
      GoogLeNet (arrays of any kind np.asarray takes).

  Returns:
    {torch name: numpy array}: conv weights (O, I, H, W), Linear (out, in),
    with flattened inputs in torch's (C, H, W) order (`FLATTENED_INPUTS`).
  """
  flat = {path: np.asarray(value)
          for path, value in traverse_util.flatten_dict(dict(variables)).items()}
  names = {path: torch_name(path) for path in flat}
  _permute_flattened(flat, names, hwc_rows_to_chw)

  state_dict = {}
  for path, value in flat.items():
    key = names[path]
    state_dict[key] = np.ascontiguousarray(_to_torch_layout(value))
    if path[0] == 'batch_stats' and path[-1] == 'mean':
      state_dict[key[:-len('running_mean')] + COUNTER] = np.zeros((), np.int64)
  return state_dict


def load_torchvision(path, model, input_shape=(224, 224, 3)) -> Dict[str, Any]:
  """Reads a torchvision-layout `.safetensors` file into `model`'s variables.

  Arguments:
    path: the weights file (see `load_safetensors`).
    model: the jdl ResNet, AlexNet or GoogLeNet to load into (see `torch_to_jdl`).
    input_shape: one example's (H, W, C).

  Returns:
    {'params': ..., 'batch_stats': ...} for model.apply(variables, x, train=False).

  Raises:
    CheckpointError: the file cannot be read or does not fit the model; the
      message names the file.
  """
  state_dict = load_safetensors(path)
  try:
    return torch_to_jdl(state_dict, model, input_shape)
  except CheckpointError as e:
    raise CheckpointError(f'{os.fspath(path)}: {e}') from None


load_resnet = load_torchvision  # its first name, from when it loaded ResNets only


# ------------------------------------------------- PyTorch recurrent layers

def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch.Tensor, without importing torch
    value = value.detach().cpu().numpy()
  return np.asarray(value, np.float32)


def convert_torch_state_dict(state_dict: Dict[str, Any], cell: str, num_layers: int,
                             bidirectional: bool) -> Dict[str, Dict[str, np.ndarray]]:
  """Maps a torch.nn.LSTM/GRU/RNN state dict to the params of `RNN`.

  Use as `model.apply({'params': params}, x)` for `RNN`, or as
  params['rnn'] of an `RNNClassifier`. The PyTorch module must have bias=True,
  proj_size=0 and, to match outputs, batch_first inputs given as (B, T, F).

  Arguments:
    state_dict: {'weight_ih_l0': (G*H, F), 'weight_hh_l0': (G*H, H),
      'bias_ih_l0': (G*H,), 'bias_hh_l0': (G*H,), ... '_reverse' for the backward
      direction}; values numpy arrays, torch tensors or anything np.asarray takes.
    cell: 'rnn', 'lstm' or 'gru' (the PyTorch class).
    num_layers: the module's num_layers.
    bidirectional: the module's bidirectional.

  Returns:
    {'layer0': {'input_kernel', 'recurrent_kernel', 'input_bias',
    'recurrent_bias'}, 'layer0_reverse': ..., ...} of float32 numpy arrays.

  Raises:
    ConfigError: an unknown cell, a missing or unexpected key, or a wrong shape.
  """
  _check_cell(cell)
  directions = ('', '_reverse') if bidirectional else ('',)
  source = {k: _to_numpy(v) for k, v in state_dict.items()}
  if 'weight_hh_l0' not in source:
    raise ConfigError('torch state dict has no key weight_hh_l0')
  hidden = source['weight_hh_l0'].shape[-1]
  gh = GATES[cell] * hidden
  if 'weight_ih_l0' not in source:
    raise ConfigError('torch state dict has no key weight_ih_l0')
  features = source['weight_ih_l0'].shape[-1]

  params, used = {}, set()
  for layer in range(num_layers):
    width = features if layer == 0 else len(directions) * hidden
    for suffix in directions:
      expected = {f'weight_ih_l{layer}{suffix}': (gh, width),
                  f'weight_hh_l{layer}{suffix}': (gh, hidden),
                  f'bias_ih_l{layer}{suffix}': (gh,),
                  f'bias_hh_l{layer}{suffix}': (gh,)}
      for key, shape in expected.items():
        if key not in source:
          raise ConfigError(f'torch state dict has no key {key} ({cell}, {num_layers} '
                            f'layers, bidirectional={bidirectional})')
        if source[key].shape != shape:
          raise ConfigError(f'torch state dict {key} has shape {source[key].shape}, '
                            f'expected {shape} for a {cell} with hidden size {hidden}')
      used.update(expected)
      w_ih, w_hh, b_ih, b_hh = (source[k] for k in expected)
      params[f'layer{layer}{suffix}'] = {
          'input_kernel': np.ascontiguousarray(w_ih.T),  # (F, G*H)
          'recurrent_kernel': np.ascontiguousarray(w_hh.T),  # (H, G*H)
          'input_bias': b_ih,  # (G*H,)
          'recurrent_bias': b_hh,  # (G*H,); differs from b_ih in the GRU's n gate
      }
  extra = sorted(set(source) - used)
  if extra:
    raise ConfigError(f'torch state dict has unexpected key {extra[0]} for a {cell} with '
                      f'{num_layers} layers, bidirectional={bidirectional}')
  return params
