"""PyTorch twins of five jdl models, for a side-by-side speed benchmark.

Each twin has jdl's layers, widths, bias choices and BatchNorm placement, so the
trainable parameter counts are equal (BatchNorm running statistics are torch
buffers, jdl's 'batch_stats'; they are not counted):

    'cnn'    jdl.models.cnn.CNN on (B, 3, 32, 32)                    528,054 params
             Conv(16, k2, same) relu pool2 -> Conv(32) ... -> Conv(64) ... ->
             Dropout(.3) -> Flatten -> Linear(500) relu -> Dropout(.4) -> Linear(10)
             RMSprop(1e-3, alpha 0.9, eps 1e-7) + softmax cross-entropy.
    'lstm'   jdl RNNClassifier(cell='lstm', hidden 128, 1 layer, 10 classes) on
             (B, T=40, F=32): nn.LSTM(32, 128) -> last h -> Linear(10)   84,234 params
             Adam(1e-3).
    'dcgan'  jdl.models.decoder Generator(g_width=128) + Discriminator(d_width=32)
             for 32x32x3 images, latent 100; jdl.gan.gan_train_step's update with
             real_label 0.9; Adam(2e-4, betas (0.5, 0.999)) for both.  538,468 params
    'fastnet'  jdl.models.fastnet.FastNet (airbench94's net) on (B, 3, 32, 32)
             SGD momentum 0.9, lr 0.1 (jdl 'momentum')                 1,971,640 params
    'resnet18' jdl ResNet18 (stem='cifar') on (B, 3, 32, 32), same optimizer
                                                                      11,173,962 params

Known differences from jdl, none of which changes the work done per step:
  - RMSprop: torch puts eps outside the root, g / (sqrt(v) + eps); jdl (Keras)
    inside, g / sqrt(v + eps). Same cost; they agree once v >> eps.
  - Flatten order: torch flattens (C, H, W), jdl (H, W, C). The next Linear's
    weight is the same matrix with its input rows permuted (`cnn_params_to_jdl`
    permutes them); likewise the generator's first Linear reshapes to
    (B, C, 4, 4), jdl to (B, 4, 4, C): its output rows are permuted.
  - Initialisation follows PyTorch's defaults except for the DCGAN, which uses
    jdl's N(0, 0.02) kernels and N(1, 0.02) BatchNorm scales.

    step = build('cnn', batch_size=128, channels_last=True)
    step()  # one training step; step.losses holds its losses

torch is an optional dependency: only the benchmark imports this module.
"""
import contextlib
from typing import Callable, Dict

import torch
from torch import nn
import torch.nn.functional as F

NAMES = ('cnn', 'lstm', 'dcgan', 'fastnet', 'resnet18')
IMAGE_MODELS = ('cnn', 'dcgan', 'fastnet', 'resnet18')
IMAGE_SHAPE = (3, 32, 32)  # (C, H, W) of the cnn's and the dcgan's images
NUM_CLASSES = 10
SEQUENCE_SHAPE = (40, 32)  # (T, F) of the lstm's inputs
LATENT_DIM = 100  # GANConfig.latent_dim
REAL_LABEL = 0.9  # GANConfig.real_label: D's target for real images


# ------------------------------------------------------------------ models


class CNN(nn.Module):
  """jdl.models.cnn.CNN with its defaults: three conv blocks, two Linear layers.

  Arguments:
    filters: output channels of each Conv(k2, 'same') -> ReLU -> MaxPool(2) block.
    dense_size: width of the hidden Linear layer.
    num_classes: number of logits.
    image_shape: (C, H, W) of the inputs.
  """

  def __init__(self, filters=(16, 32, 64), dense_size=500, num_classes=NUM_CLASSES,
               image_shape=IMAGE_SHAPE):
    super().__init__()
    channels, height, width = image_shape
    convs = []
    for out in filters:
      # 'same' with an even kernel pads 0 before and 1 after, as Flax and Keras do.
      convs.append(nn.Conv2d(channels, out, 2, padding='same'))
      channels, height, width = out, height // 2, width // 2
    self.convs = nn.ModuleList(convs)
    self.dropout1 = nn.Dropout(0.3)
    self.dense1 = nn.Linear(channels * height * width, dense_size)  # inputs in (C, H, W) order
    self.dropout2 = nn.Dropout(0.4)
    self.head = nn.Linear(dense_size, num_classes)

  def forward(self, x):  # (B, C, H, W) -> logits (B, num_classes)
    for conv in self.convs:
      x = F.max_pool2d(F.relu(conv(x)), 2)  # (B, out, H/2, W/2)
    x = self.dropout1(x).flatten(1)  # (B, C*H*W), (C, H, W) order
    x = self.dropout2(F.relu(self.dense1(x)))  # (B, dense_size)
    return self.head(x)


class LSTMClassifier(nn.Module):
  """jdl RNNClassifier(cell='lstm', num_layers=1): LSTM -> last h -> Linear.

  Arguments:
    features: F, the input width.
    hidden_size: H.
    num_classes: number of logits.
  """

  def __init__(self, features=SEQUENCE_SHAPE[1], hidden_size=128, num_classes=NUM_CLASSES):
    super().__init__()
    self.rnn = nn.LSTM(features, hidden_size, batch_first=True)
    self.head = nn.Linear(hidden_size, num_classes)

  def forward(self, x):  # (B, T, F) -> logits (B, num_classes)
    _, (h, _) = self.rnn(x)  # h: (num_layers, B, H)
    return self.head(h[-1])


def _dcgan_init(module: nn.Module):
  """jdl's DCGAN init: kernels N(0, 0.02), BatchNorm scales N(1, 0.02), biases 0."""
  for m in module.modules():
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
      nn.init.normal_(m.weight, 0.0, 0.02)
      if m.bias is not None:
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
      nn.init.normal_(m.weight, 1.0, 0.02)
      nn.init.zeros_(m.bias)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
  # jdl: Flax momentum 0.9 (weight of the old average) = torch momentum 0.1.
  return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


class Generator(nn.Module):
  """jdl.models.decoder.Generator (unconditional) for 32x32 images: 4x4 base, 3 upsamplings.

  Linear(no bias) -> (B, W, 4, 4) -> BN -> ReLU -> 2 x [ConvTranspose(k4, s2, p1,
  no bias) -> BN -> ReLU], width halved -> ConvTranspose(k4, s2, p1) to C -> tanh.

  Arguments:
    latent_dim: Z.
    base_width: channels of the 4x4 feature map (GANConfig.g_width).
    channels: C of the images.
  """

  def __init__(self, latent_dim=LATENT_DIM, base_width=128, channels=IMAGE_SHAPE[0]):
    super().__init__()
    self.base_width = base_width
    self.project = nn.Linear(latent_dim, 4 * 4 * base_width, bias=False)
    self.project_bn = _batch_norm(base_width)
    blocks, width = [], base_width
    for _ in range(2):  # 4 -> 8 -> 16
      blocks += [nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1, bias=False),
                 _batch_norm(width // 2), nn.ReLU()]
      width //= 2
    blocks.append(nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1))  # 16 -> 32
    self.blocks = nn.Sequential(*blocks)
    _dcgan_init(self)

  def forward(self, z):  # (B, Z) -> images (B, C, 32, 32) in [-1, 1]
    x = self.project(z).view(z.shape[0], self.base_width, 4, 4)  # (B, W, 4, 4)
    x = F.relu(self.project_bn(x))
    return torch.tanh(self.blocks(x))


class Discriminator(nn.Module):
  """jdl.models.decoder.Discriminator (unconditional) for 32x32 images.

  Conv(W, k4, s2, p1, bias) -> LeakyReLU(0.2) -> 2 x [Conv(k4, s2, p1, no bias)
  -> BN -> LeakyReLU(0.2)], width doubled (32 -> 16 -> 8 -> 4) -> Flatten
  -> Linear(1).

  Arguments:
    base_width: channels of the first conv (GANConfig.d_width).
    channels: C of the images.
  """

  def __init__(self, base_width=32, channels=IMAGE_SHAPE[0]):
    super().__init__()
    layers, width = [nn.Conv2d(channels, base_width, 4, stride=2, padding=1),
                     nn.LeakyReLU(0.2)], base_width
    for _ in range(2):
      layers += [nn.Conv2d(width, 2 * width, 4, stride=2, padding=1, bias=False),
                 _batch_norm(2 * width), nn.LeakyReLU(0.2)]
      width *= 2
    self.features = nn.Sequential(*layers)
    self.head = nn.Linear(width * 4 * 4, 1)
    _dcgan_init(self)

  def forward(self, images):  # (B, C, 32, 32) -> logits (B,)
    return self.head(self.features(images).flatten(1))[:, 0]


class FastNet(nn.Module):
  """jdl.models.fastnet.FastNet with its defaults (airbench94's net).

  Whitening Conv(24, 2x2, valid, bias) + GELU, three groups of
  Conv3x3 -> MaxPool2 -> BN -> GELU -> Conv3x3 -> BN -> GELU (no conv bias,
  BatchNorm with a learned shift only: its scale is frozen at 1, eps 1e-12,
  torch momentum 0.6), global max pool, Linear(no bias) * 1/9. GELU is the
  exact (erf) one, as jdl's 'gelu'.
  """

  def __init__(self, widths=(64, 256, 256), whiten_width=24, num_classes=NUM_CLASSES,
               logit_scale=1 / 9):
    super().__init__()
    self.whiten = nn.Conv2d(IMAGE_SHAPE[0], whiten_width, 2)
    layers, channels = [], whiten_width
    for width in widths:
      bn1, bn2 = (nn.BatchNorm2d(width, eps=1e-12, momentum=0.6) for _ in range(2))
      for bn in (bn1, bn2):
        bn.weight.requires_grad_(False)  # shift only, as jdl's use_scale=False
      layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.MaxPool2d(2), bn1,
                 nn.GELU(), nn.Conv2d(width, width, 3, padding=1, bias=False), bn2, nn.GELU()]
      channels = width
    self.groups = nn.Sequential(*layers)
    self.head = nn.Linear(channels, num_classes, bias=False)
    self.logit_scale = logit_scale

  def forward(self, x):  # (B, C, 32, 32) -> logits (B, num_classes)
    x = self.groups(F.gelu(self.whiten(x)))  # (B, 256, 3, 3)
    return self.head(global_max_pool(x)) * self.logit_scale


def global_max_pool(x):
  """Max over the spatial axes: (B, C, H, W) -> (B, C), as jdl's GlobalMaxPool.

  `F.adaptive_max_pool2d`, not `torch.amax`: under torch.compile with bfloat16
  autocast, amax's backward (an equality mask against a recomputed input,
  divided by the number of matches) gave NaN gradients from the first step on
  (PyTorch 2.13 CPU; pytorch/pytorch#186799 reports it on CUDA too), so the
  GPU benchmark's fair-best side would have timed a NaN step. This backward
  sends each gradient to one argmax; jdl's splits it among exact ties, which
  float32 inputs practically never have.
  """
  return F.adaptive_max_pool2d(x, 1).flatten(1)


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: two 3x3 convs with BN, identity or 1x1-conv shortcut."""

  def __init__(self, channels, width, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(channels, width, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.downsample = None
    if stride != 1 or channels != width:
      self.downsample = nn.Sequential(nn.Conv2d(channels, width, 1, stride, bias=False),
                                      nn.BatchNorm2d(width))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
  """jdl ResNet18 with stem='cifar' (its default): 3x3 stride-1 stem, no max
  pool, stages (64, 128, 256, 512) x 2 BasicBlocks, average pool, Linear."""

  def __init__(self, widths=(64, 128, 256, 512), num_classes=NUM_CLASSES):
    super().__init__()
    self.conv1 = nn.Conv2d(IMAGE_SHAPE[0], widths[0], 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    blocks, channels = [], widths[0]
    for i, width in enumerate(widths):
      for j in range(2):
        blocks.append(BasicBlock(channels, width, 2 if i > 0 and j == 0 else 1))
        channels = width
    self.blocks = nn.Sequential(*blocks)
    self.fc = nn.Linear(channels, num_classes)

  def forward(self, x):  # (B, C, H, W) -> logits (B, num_classes)
    x = self.blocks(F.relu(self.bn1(self.conv1(x))))
    return self.fc(x.mean(dim=(2, 3)))


def make_models(name: str) -> Dict[str, nn.Module]:
  """The named twin's modules, freshly initialised on the CPU: {'model'} or {'g', 'd'}.

  Arguments:
    name: one of NAMES.
  """
  if name == 'cnn':
    return {'model': CNN()}
  if name == 'lstm':
    return {'model': LSTMClassifier()}
  if name == 'dcgan':
    return {'g': Generator(), 'd': Discriminator()}
  if name == 'fastnet':
    return {'model': FastNet()}
  if name == 'resnet18':
    return {'model': ResNet18()}
  raise ValueError(f'unknown torch reference model {name!r}; choose one of: {", ".join(NAMES)}')


def count_params(name: str) -> int:
  """Trainable parameters of the named twin (BatchNorm running stats excluded).

  Arguments:
    name: one of NAMES ('dcgan': generator + discriminator).
  """
  return sum(p.numel() for m in make_models(name).values()
             for p in m.parameters() if p.requires_grad)


# ------------------------------------------------------------------ weights


def cnn_params_to_jdl(model: CNN) -> Dict[str, Dict[str, 'object']]:
  """The twin's weights as jdl CNN params (numpy), for `CNN.apply({'params': ...})`.

  Conv weight (O, I, kh, kw) -> kernel (kh, kw, I, O); Linear weight (out, in)
  -> kernel (in, out), where dense1's input rows go from torch's (C, H, W)
  flatten order to jdl's (H, W, C).

  Arguments:
    model: a `CNN` with the default three conv blocks on 32x32 inputs.
  """
  numpy = lambda t: t.detach().cpu().float().numpy()
  params = {}
  for i, conv in enumerate(model.convs):
    params[f'conv{i + 1}'] = {'kernel': numpy(conv.weight.permute(2, 3, 1, 0)),
                              'bias': numpy(conv.bias)}
  channels = model.convs[-1].out_channels
  side = int(round((model.dense1.in_features // channels) ** 0.5))
  w = model.dense1.weight.view(-1, channels, side, side)  # (out, C, H, W)
  params['dense1'] = {'kernel': numpy(w.permute(2, 3, 1, 0).reshape(-1, w.shape[0])),
                      'bias': numpy(model.dense1.bias)}
  params['head'] = {'kernel': numpy(model.head.weight.t()), 'bias': numpy(model.head.bias)}
  return params


# ------------------------------------------------------------------ steps


@contextlib.contextmanager
def _batch_stats_frozen(module: nn.Module):
  """BatchNorm uses batch statistics but leaves the running ones alone (jdl's G pass through D)."""
  norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
  for m in norms:
    m.track_running_stats = False
  try:
    yield
  finally:
    for m in norms:
      m.track_running_stats = True


def build(name: str, batch_size: int, device: str = 'cpu', channels_last: bool = False,
          compile: bool = False, autocast_bf16: bool = False) -> Callable[[], None]:
  """Returns step(): one full training step of the named twin on fixed synthetic data.

  The inputs (N(0, 1) images or sequences, uniform [-1, 1] 'real' images for the
  dcgan) and random labels are made once, on `device`. step() returns None and
  ends with torch.cuda.synchronize() on CUDA (nothing extra on the CPU). For
  tests it carries `step.modules` (the nn.Modules) and `step.losses` (the last
  step's loss tensors, by name; reading them synchronises).

  Arguments:
    name: one of NAMES.
    batch_size: examples per step (real images per step for the dcgan).
    device: torch device string, e.g. 'cpu' or 'cuda'.
    channels_last: NHWC memory format for the image models' weights and inputs.
    compile: wrap each module in torch.compile.
    autocast_bf16: run forward passes and losses under torch.autocast(bfloat16).
  """
  device = torch.device(device)
  modules = {k: m.to(device).train() for k, m in make_models(name).items()}
  images = name in IMAGE_MODELS
  fmt = torch.channels_last if channels_last and images else torch.contiguous_format
  for m in modules.values():
    m.to(memory_format=fmt)
  nets = {k: torch.compile(m) if compile else m for k, m in modules.items()}
  rng = torch.Generator(device='cpu').manual_seed(0)
  autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast_bf16 else (
      contextlib.nullcontext)
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
  losses = {}

  if name != 'dcgan':
    shape = (batch_size, *IMAGE_SHAPE) if images else (batch_size, *SEQUENCE_SHAPE)
    x = torch.randn(shape, generator=rng).to(device, memory_format=fmt)  # (B, C, H, W) or (B, T, F)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=rng).to(device)  # (B,)
    model, net = modules['model'], nets['model']
    trainable = [p for p in model.parameters() if p.requires_grad]
    if name == 'cnn':  # jdl's rmsprop: decay 0.9, eps 1e-7 (torch: outside the root)
      opt = torch.optim.RMSprop(trainable, lr=1e-3, alpha=0.9, eps=1e-7)
    elif name == 'lstm':
      opt = torch.optim.Adam(trainable, lr=1e-3)
    else:  # jdl's 'momentum' (optax.trace(0.9)) at the benchmark's learning rate 0.1
      opt = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)

    def step():
      opt.zero_grad(set_to_none=True)
      with autocast():
        loss = F.cross_entropy(net(x).float(), y)
      loss.backward()
      opt.step()
      losses['loss'] = loss.detach()
      sync()
  else:
    real = (torch.rand((batch_size, *IMAGE_SHAPE), generator=rng) * 2 - 1).to(
        device, memory_format=fmt)  # (B, C, H, W) in [-1, 1]
    g, d = modules['g'], modules['d']
    g_net, d_net = nets['g'], nets['d']
    g_opt = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    g_params = list(g.parameters())
    real_target = torch.full((batch_size,), REAL_LABEL, device=device)
    fake_target = torch.zeros((batch_size,), device=device)
    bce = F.binary_cross_entropy_with_logits

    def step():
      # As jdl.gan.gan_train_step: one G pass, D on real and fake as separate batches.
      z = torch.randn((batch_size, LATENT_DIM), device=device)  # (B, Z)
      with autocast():
        fake = g_net(z)  # (B, C, H, W); G's BatchNorm stats update here
        if channels_last:
          fake = fake.contiguous(memory_format=torch.channels_last)
      d_opt.zero_grad(set_to_none=True)
      with autocast():
        d_loss = (bce(d_net(real).float(), real_target)
                  + bce(d_net(fake.detach()).float(), fake_target))
      d_loss.backward()
      d_opt.step()
      # G: non-saturating loss through the updated D; D's running stats stay put and
      # only G's gradients are computed (jdl takes the vjp through D's input only).
      g_opt.zero_grad(set_to_none=True)
      with autocast(), _batch_stats_frozen(d):
        g_loss = bce(d_net(fake).float(), torch.ones_like(fake_target))
      g_loss.backward(inputs=g_params)
      g_opt.step()
      losses.update(d_loss=d_loss.detach(), g_loss=g_loss.detach())
      sync()

  step.modules = modules
  step.losses = losses
  return step
