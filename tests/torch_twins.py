"""torchvision's AlexNet and GoogLeNet, written out in plain torch (torchvision is
not installed beside this torch), for tests/test_alexnet_googlenet.py.

The module trees, names and forwards are torchvision's (models/alexnet.py and
models/googlenet.py), so their state dicts have torchvision's keys. Two
arguments reach jdl's variants: `stem='cifar'` (jdl.models.alexnet and
jdl.models.googlenet say what changes) and `width` (channels times width / 64).
Imports torch: import this module only after pytest.importorskip('torch').
"""
import torch
import torch.nn.functional as F
from torch import nn


def _scale(channels, width):
  return max(1, channels * width // 64)


class AlexNet(nn.Module):
  """torchvision.models.AlexNet (stem='imagenet', width=64: its exact tree)."""

  def __init__(self, num_classes=1000, dropout=0.5, stem='imagenet', width=64):
    super().__init__()
    c = lambda n: _scale(n, width)
    pool_pad = 1 if stem == 'cifar' else 0
    first = (nn.Conv2d(3, c(64), kernel_size=3, stride=2, padding=1) if stem == 'cifar'
             else nn.Conv2d(3, c(64), kernel_size=11, stride=4, padding=2))
    self.features = nn.Sequential(
        first,
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=pool_pad),
        nn.Conv2d(c(64), c(192), kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=pool_pad),
        nn.Conv2d(c(192), c(384), kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(c(384), c(256), kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(c(256), c(256), kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=pool_pad),
    )
    side = 2 if stem == 'cifar' else 6
    self.avgpool = nn.AdaptiveAvgPool2d((side, side))
    self.classifier = nn.Sequential(
        nn.Dropout(p=dropout),
        nn.Linear(c(256) * side * side, c(4096)),
        nn.ReLU(inplace=True),
        nn.Dropout(p=dropout),
        nn.Linear(c(4096), c(4096)),
        nn.ReLU(inplace=True),
        nn.Linear(c(4096), num_classes),
    )

  def forward(self, x):  # (B, 3, H, W)
    x = self.features(x)
    x = self.avgpool(x)
    x = torch.flatten(x, 1)  # (C, H, W) order
    return self.classifier(x)


class BasicConv2d(nn.Module):

  def __init__(self, in_channels, out_channels, **kwargs):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
    self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):

  def __init__(self, in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj):
    super().__init__()
    self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
    self.branch2 = nn.Sequential(
        BasicConv2d(in_channels, ch3x3red, kernel_size=1),
        BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1))
    self.branch3 = nn.Sequential(
        BasicConv2d(in_channels, ch5x5red, kernel_size=1),
        # torchvision's 3x3 where the paper has 5x5 (pytorch/vision#906).
        BasicConv2d(ch5x5red, ch5x5, kernel_size=3, padding=1))
    self.branch4 = nn.Sequential(
        nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
        BasicConv2d(in_channels, pool_proj, kernel_size=1))

  def forward(self, x):
    return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):

  def __init__(self, in_channels, num_classes, dropout=0.7, width=64):
    super().__init__()
    self.conv = BasicConv2d(in_channels, _scale(128, width), kernel_size=1)
    self.fc1 = nn.Linear(_scale(128, width) * 16, _scale(1024, width))
    self.fc2 = nn.Linear(_scale(1024, width), num_classes)
    self.dropout = nn.Dropout(p=dropout)

  def forward(self, x):
    x = F.adaptive_avg_pool2d(x, (4, 4))
    x = self.conv(x)
    x = torch.flatten(x, 1)  # (C, H, W) order
    x = F.relu(self.fc1(x), inplace=True)
    x = self.dropout(x)
    return self.fc2(x)


# (in, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj) at width 64, as torchvision.
INCEPTION = {
    '3a': (192, 64, 96, 128, 16, 32, 32), '3b': (256, 128, 128, 192, 32, 96, 64),
    '4a': (480, 192, 96, 208, 16, 48, 64), '4b': (512, 160, 112, 224, 24, 64, 64),
    '4c': (512, 128, 128, 256, 24, 64, 64), '4d': (512, 112, 144, 288, 32, 64, 64),
    '4e': (528, 256, 160, 320, 32, 128, 128), '5a': (832, 256, 160, 320, 32, 128, 128),
    '5b': (832, 384, 192, 384, 48, 128, 128),
}


class GoogLeNet(nn.Module):
  """torchvision.models.GoogLeNet (stem='imagenet', width=64: its exact tree).

  In training mode with aux_logits it returns (logits, aux2, aux1), as
  torchvision's GoogLeNetOutputs does; else the logits.
  """

  def __init__(self, num_classes=1000, aux_logits=False, transform_input=False, dropout=0.2,
               dropout_aux=0.7, stem='imagenet', width=64):
    super().__init__()
    c = lambda n: _scale(n, width)
    self.aux_logits = aux_logits
    self.transform_input = transform_input
    self.stem = stem
    if stem == 'cifar':
      self.conv1 = BasicConv2d(3, c(64), kernel_size=3, stride=1, padding=1)
    else:
      self.conv1 = BasicConv2d(3, c(64), kernel_size=7, stride=2, padding=3)
      self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
    self.conv2 = BasicConv2d(c(64), c(64), kernel_size=1)
    self.conv3 = BasicConv2d(c(64), c(192), kernel_size=3, padding=1)
    self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
    for key, (_, *channels) in INCEPTION.items():
      # Channel counts scale one by one, so in = the previous module's four outputs.
      if key == '4a':
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
      if key == '5a':
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
      setattr(self, f'inception{key}', Inception(self._in(key, width), *map(c, channels)))
    if aux_logits:
      self.aux1 = InceptionAux(self._in('4b', width), num_classes, dropout_aux, width)
      self.aux2 = InceptionAux(self._in('4e', width), num_classes, dropout_aux, width)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.dropout = nn.Dropout(p=dropout)
    self.fc = nn.Linear(c(1024), num_classes)

  @staticmethod
  def _in(key, width):
    """Input channels of module `key`: conv3's, or the previous module's outputs."""
    keys = list(INCEPTION)
    if key == '3a':
      return _scale(192, width)
    _, ch1x1, _, ch3x3, _, ch5x5, pool_proj = INCEPTION[keys[keys.index(key) - 1]]
    return sum(_scale(n, width) for n in (ch1x1, ch3x3, ch5x5, pool_proj))

  def forward(self, x):  # (B, 3, H, W)
    if self.transform_input:
      x_ch0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
      x_ch1 = torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
      x_ch2 = torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
      x = torch.cat((x_ch0, x_ch1, x_ch2), 1)
    x = self.conv1(x)
    if self.stem == 'imagenet':
      x = self.maxpool1(x)
    x = self.conv3(self.conv2(x))
    x = self.maxpool2(x)
    x = self.inception3b(self.inception3a(x))
    x = self.maxpool3(x)
    x = self.inception4a(x)
    aux1 = self.aux1(x) if self.aux_logits and self.training else None
    x = self.inception4d(self.inception4c(self.inception4b(x)))
    aux2 = self.aux2(x) if self.aux_logits and self.training else None
    x = self.inception4e(x)
    x = self.maxpool4(x)
    x = self.inception5b(self.inception5a(x))
    x = torch.flatten(self.avgpool(x), 1)
    x = self.fc(self.dropout(x))
    return (x, aux2, aux1) if aux1 is not None else x


def randomize_batchnorm(net, generator=None):
  """Random BatchNorm affine and running statistics, so a swapped or dropped one shows."""
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5, generator=generator)
        module.bias.normal_(0.0, 0.1, generator=generator)
        module.running_mean.normal_(0.0, 0.1, generator=generator)
        module.running_var.uniform_(0.5, 1.5, generator=generator)
  return net
