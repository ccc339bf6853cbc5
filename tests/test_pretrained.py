"""jdl.pretrained: torchvision-layout ResNet weights in and out via safetensors.

Layouts are checked without torch (random variables of the model's shapes, no
forward pass); with torch installed, a plain-torch twin of torchvision's ResNet
must give the same logits as jdl on the loaded weights.
"""
import pathlib
import pickle

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from jdl import pretrained
from jdl.errors import CheckpointError
from jdl.models import ResNet, ResNet18

CIFAR_SHAPE = (32, 32, 3)  # (H, W, C) of the small inputs


def _random_variables(model, input_shape, seed=0):
  """Random values for every variable of `model` (shapes from eval_shape, no compile).

  BatchNorm variances are drawn positive, as trained ones are.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for path, spec in pretrained.target_shapes(model, input_shape).items():
    value = rng.normal(size=spec.shape)
    if path[-1] == 'var':
      value = rng.uniform(0.5, 1.5, size=spec.shape)
    flat[path] = value.astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def _leaves(variables):
  return traverse_util.flatten_dict(variables)


@pytest.fixture(scope='module')
def cifar18():
  """(model, random variables, torch-layout state dict) of a 10-class CIFAR ResNet18."""
  model = ResNet18(stem='cifar', num_classes=10)
  variables = _random_variables(model, CIFAR_SHAPE)
  return model, variables, pretrained.jdl_to_torch(variables)


# ------------------------------------------------------------------ layouts, no torch


def test_layout_round_trip_is_bit_exact(cifar18, tmp_path):
  model, variables, state_dict = cifar18
  assert state_dict['conv1.weight'].shape == (64, 3, 3, 3)  # OIHW
  assert state_dict['layer1.0.conv1.weight'].shape == (64, 64, 3, 3)
  assert state_dict['layer2.0.downsample.0.weight'].shape == (128, 64, 1, 1)
  assert state_dict['layer2.0.downsample.1.running_var'].shape == (128,)
  assert state_dict['fc.weight'].shape == (10, 512)  # (out, in)
  assert state_dict['fc.bias'].shape == (10,)
  assert state_dict['bn1.running_var'].shape == (64,)
  assert state_dict['bn1.num_batches_tracked'].dtype == np.int64
  # The values are rearranged, not copied as they are: conv HWIO[h, w, i, o] = OIHW[o, i, h, w].
  np.testing.assert_array_equal(state_dict['layer1.0.conv2.weight'][5, 7, 2, 0],
                                variables['params']['layer1_0']['conv2']['kernel'][2, 0, 7, 5])
  # 102 variables (20 convs, 20 BatchNorms x 4, fc x 2) and torchvision's 20 BN counters.
  assert len(state_dict) == 102 + 20

  path = tmp_path / 'resnet18.safetensors'
  pretrained.save_safetensors(variables, path)
  loaded = pretrained.load_resnet(path, model, CIFAR_SHAPE)
  want, got = _leaves(variables), _leaves(loaded)
  assert got.keys() == want.keys()
  for key in want:
    assert got[key].dtype == np.float32
    np.testing.assert_array_equal(got[key], want[key], err_msg='/'.join(key))


def test_bottleneck_names_round_trip():
  # A tiny two-stage bottleneck net: torchvision's Bottleneck names conv3 / bn3.
  model = ResNet(stage_sizes=(1, 1), widths=(8, 16), block='bottleneck', stem='imagenet',
                 num_classes=3)
  variables = _random_variables(model, CIFAR_SHAPE)
  state_dict = pretrained.jdl_to_torch(variables)
  assert state_dict['conv1.weight'].shape == (8, 3, 7, 7)
  assert state_dict['layer1.0.conv3.weight'].shape == (32, 8, 1, 1)  # 4x expansion
  assert state_dict['layer1.0.downsample.0.weight'].shape == (32, 8, 1, 1)
  assert state_dict['layer2.0.bn3.running_mean'].shape == (64,)
  loaded = _leaves(pretrained.torch_to_jdl(state_dict, model, CIFAR_SHAPE))
  for key, value in _leaves(variables).items():
    np.testing.assert_array_equal(loaded[key], value, err_msg='/'.join(key))


def test_half_precision_file_loads_as_float32(cifar18, tmp_path):
  # Hub weights are often bfloat16; numpy reads them once jax has registered the dtype.
  model, _, state_dict = cifar18
  half = {k: v.astype(jnp.bfloat16) if v.dtype == np.float32 else v for k, v in state_dict.items()}
  path = tmp_path / 'half.safetensors'
  safetensors.numpy.save_file(half, str(path))
  kernel = pretrained.load_resnet(path, model, CIFAR_SHAPE)['params']['fc']['kernel']
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(kernel, half['fc.weight'].astype(np.float32).T)


# ------------------------------------------------------------------ errors


def test_wrong_class_count_names_fc_and_both_shapes(cifar18):
  model, _, state_dict = cifar18
  imagenet_head = dict(state_dict, **{'fc.weight': np.zeros((1000, 512), np.float32),
                                      'fc.bias': np.zeros((1000,), np.float32)})
  with pytest.raises(CheckpointError) as error:
    pretrained.torch_to_jdl(imagenet_head, model, CIFAR_SHAPE)
  message = str(error.value)
  assert 'fc.weight -> params/fc/kernel' in message
  assert '(1000, 512)' in message and '(512, 1000)' in message and '(512, 10)' in message
  assert 'num_classes=1000' in message


def test_wrong_stem_is_named(cifar18):
  model, _, state_dict = cifar18
  imagenet_stem = dict(state_dict, **{'conv1.weight': np.zeros((64, 3, 7, 7), np.float32)})
  with pytest.raises(CheckpointError, match=r"conv1.weight .*\(7, 7, 3, 64\).*stem='imagenet'"):
    pretrained.torch_to_jdl(imagenet_stem, model, CIFAR_SHAPE)


def test_missing_and_unexpected_keys_are_named(cifar18, tmp_path):
  model, _, state_dict = cifar18
  missing = {k: v for k, v in state_dict.items() if k != 'layer3.1.bn2.running_var'}
  path = tmp_path / 'missing.safetensors'
  safetensors.numpy.save_file(missing, str(path))
  with pytest.raises(CheckpointError) as error:
    pretrained.load_resnet(path, model, CIFAR_SHAPE)
  message = str(error.value)
  assert str(path) in message  # load_resnet names the file
  assert 'layer3.1.bn2.running_var' in message and 'batch_stats/layer3_1/bn2/var' in message

  # A deeper net's extra block (a resnet34 file in a resnet18).
  deeper = dict(state_dict, **{'layer1.2.conv1.weight': state_dict['layer1.0.conv1.weight']})
  with pytest.raises(CheckpointError, match='no place for: layer1.2.conv1.weight'):
    pretrained.torch_to_jdl(deeper, model, CIFAR_SHAPE)

  parallel = {f'module.{k}': v for k, v in state_dict.items()}
  with pytest.raises(CheckpointError, match="start with 'module.'"):
    pretrained.torch_to_jdl(parallel, model, CIFAR_SHAPE)


# ------------------------------------------------------------------ untrusted files


class _Payload:
  """Unpickling this creates `marker`: what a malicious weights file could do instead."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.mark.parametrize('name, expected', [
    ('weights.safetensors', 'not a valid safetensors file.*torch.save / pickle'),
    ('weights.pt', 'never loads pickle'),
])
def test_pickle_is_never_loaded(tmp_path, name, expected):
  marker = tmp_path / 'pwned'
  payload = pickle.dumps({'conv1.weight': _Payload(marker)})
  path = tmp_path / name
  path.write_bytes(payload)
  with pytest.raises(CheckpointError, match=expected):
    pretrained.load_safetensors(path)
  with pytest.raises(CheckpointError, match=expected):
    pretrained.load_resnet(path, ResNet18(stem='cifar'), CIFAR_SHAPE)
  assert not marker.exists()
  # The payload is live: unpickling it would have created the marker.
  pickle.loads(payload)
  assert marker.exists()


def test_missing_file_and_bad_suffix_on_save(tmp_path):
  with pytest.raises(CheckpointError, match='no such weights file'):
    pretrained.load_safetensors(tmp_path / 'absent.safetensors')
  with pytest.raises(CheckpointError, match='must end with .safetensors'):
    pretrained.save_safetensors({'params': {}}, tmp_path / 'out.pt')


# ------------------------------------------------------------------ against PyTorch


def _torch_resnet(torch, block, stage_sizes, widths, stem, num_classes):
  """torchvision.models.ResNet's module names and forward, written out (no torchvision)."""
  nn = torch.nn

  class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, downsample):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.relu = nn.ReLU(inplace=True)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.downsample = downsample

    def forward(self, x):
      identity = x if self.downsample is None else self.downsample(x)
      out = self.relu(self.bn1(self.conv1(x)))
      return self.relu(self.bn2(self.conv2(out)) + identity)

  class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride here: v1.5
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(planes * 4)
      self.relu = nn.ReLU(inplace=True)
      self.downsample = downsample

    def forward(self, x):
      identity = x if self.downsample is None else self.downsample(x)
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.relu(self.bn2(self.conv2(out)))
      return self.relu(self.bn3(self.conv3(out)) + identity)

  block_cls = {'basic': BasicBlock, 'bottleneck': Bottleneck}[block]

  class TorchResNet(nn.Module):

    def __init__(self):
      super().__init__()
      if stem == 'cifar':
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
      else:
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
      self.bn1 = nn.BatchNorm2d(widths[0])
      self.relu = nn.ReLU(inplace=True)
      inplanes = widths[0]
      for i, (num_blocks, planes) in enumerate(zip(stage_sizes, widths)):
        blocks = []
        for j in range(num_blocks):
          stride = 2 if i > 0 and j == 0 else 1
          downsample = None
          if stride != 1 or inplanes != planes * block_cls.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * block_cls.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block_cls.expansion))
          blocks.append(block_cls(inplanes, planes, stride, downsample))
          inplanes = planes * block_cls.expansion
        setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
      self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
      self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):  # (B, C, H, W)
      x = self.relu(self.bn1(self.conv1(x)))
      if stem == 'imagenet':
        x = self.maxpool(x)
      for i in range(len(stage_sizes)):
        x = getattr(self, f'layer{i + 1}')(x)
      return self.fc(torch.flatten(self.avgpool(x), 1))

  return TorchResNet()


@pytest.mark.parametrize('block, stage_sizes, widths, stem, num_classes, size', [
    ('basic', (2, 2, 2, 2), (64, 128, 256, 512), 'cifar', 10, 32),  # resnet18, CIFAR stem
    ('basic', (2, 2, 2, 2), (64, 128, 256, 512), 'imagenet', 1000, 64),  # torchvision resnet18
    ('bottleneck', (1, 2), (8, 16), 'imagenet', 5, 32),  # a tiny bottleneck net
])
def test_logits_match_torch(tmp_path, block, stage_sizes, widths, stem, num_classes, size):
  torch = pytest.importorskip('torch')
  import safetensors.torch

  torch.manual_seed(0)
  net = _torch_resnet(torch, block, stage_sizes, widths, stem, num_classes)
  # Random BatchNorm affine and running statistics, so a swapped or dropped one shows.
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.1)
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  net.eval()
  path = tmp_path / 'net.safetensors'
  safetensors.torch.save_file(net.state_dict(), str(path))

  model = ResNet(stage_sizes=stage_sizes, widths=widths, block=block, stem=stem,
                 num_classes=num_classes)
  variables = pretrained.load_resnet(path, model, (size, size, 3))
  x = np.random.default_rng(1).normal(size=(2, size, size, 3)).astype(np.float32)  # (B, H, W, C)
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()  # NCHW in
  got = np.asarray(model.apply(variables, x, train=False)[0])
  assert got.shape == want.shape == (2, num_classes)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

  # Export: jdl's state dict loads strictly into the torch net and equals its own.
  exported = {k: torch.from_numpy(v) for k, v in pretrained.jdl_to_torch(variables).items()}
  net.load_state_dict(exported, strict=True)
  for key, value in net.state_dict().items():
    if not key.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(exported[key].numpy(), value.numpy(), err_msg=key)
