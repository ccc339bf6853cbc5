"""Transposed-conv sizes, DCGAN models, the GAN step, image grids, Fréchet distance.

Sizes and parameter counts come from jax.eval_shape (tracing, no compile);
forward passes and updates use tiny widths so the file runs in seconds on a
2-core CPU.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
from PIL import Image

from jdl import gan
from jdl.data import load_dataset
from jdl.errors import ConfigError
from jdl.models.decoder import (Decoder, Discriminator, Generator, conv_transpose_output_size,
                                torch_padding, upsampling_plan)
from jdl.summary import count_params, summarize
from jdl.core import PRNG_IMPL

Z = 8  # latent width in the tests


def key(seed=0):
  return jax.random.key(seed, impl=PRNG_IMPL)


def flax_side(size, kernel, stride, padding, transpose_kernel=False):
  """Output side of nn.ConvTranspose on a (1, size, size + 1, 1) input, traced only."""
  layer = nn.ConvTranspose(1, (kernel, kernel), strides=(stride, stride), padding=padding,
                           transpose_kernel=transpose_kernel)
  x = jnp.zeros((1, size, size + 1, 1))
  out = jax.eval_shape(lambda: layer.init_with_output(jax.random.key(0), x)[0])
  return out.shape[1]


# ---------------------------------------------------------------- output sizes


def test_conv_transpose_output_size_matches_flax():
  for stride in (1, 2, 3):
    for kernel in (2, 3, 4, 5):
      for size in (1, 4, 7):
        for padding in ('SAME', 'VALID'):
          expected = flax_side(size, kernel, stride, padding)
          assert conv_transpose_output_size(size, kernel, stride, padding) == expected, (
              size, kernel, stride, padding)
        for p in range(kernel):  # PyTorch-style integer padding, converted
          for op in range(min(stride, 2)):  # PyTorch needs output_padding < stride
            got = conv_transpose_output_size(size, kernel, stride, p, op)
            if got < 1:
              continue
            assert flax_side(size, kernel, stride, torch_padding(kernel, p, op)) == got, (
                size, kernel, stride, p, op)


def test_valid_differs_from_torch_when_kernel_below_stride():
  # Flax/Keras pad VALID outputs up to in*s; PyTorch padding=0 gives (in-1)*s + k.
  assert conv_transpose_output_size(4, 2, 3, 'VALID') == 12 == flax_side(4, 2, 3, 'VALID')
  assert conv_transpose_output_size(4, 2, 3, 0) == 11


# (in, kernel, stride, padding, output_padding) -> PyTorch ConvTranspose2d output side,
# written out by hand from torch's documented shape rule and common architectures.
TORCH_SIZES = [
    ((1, 4, 1, 0, 0), 4),    # DCGAN's first layer on a 1x1 latent
    ((4, 4, 2, 1, 0), 8),    # DCGAN upsampling
    ((8, 4, 2, 1, 0), 16),
    ((32, 4, 2, 1, 0), 64),
    ((7, 3, 2, 1, 1), 14),   # MNIST generators: k3 s2 p1 op1 doubles
    ((14, 3, 2, 1, 1), 28),
    ((7, 4, 2, 1, 0), 14),
    ((5, 3, 1, 1, 0), 5),    # stride 1 'same'
    ((3, 3, 3, 0, 0), 9),
    ((2, 2, 2, 0, 0), 4),
    ((4, 5, 3, 2, 0), 10),
    ((6, 5, 2, 2, 1), 12),
]


@pytest.mark.parametrize('args,expected', TORCH_SIZES)
def test_torch_reference_sizes(args, expected):
  size, kernel, stride, p, op = args
  assert conv_transpose_output_size(size, kernel, stride, p, op) == expected
  assert flax_side(size, kernel, stride, torch_padding(kernel, p, op)) == expected


def torch_conv_transpose1d(x, weight, stride, padding, output_padding=0):
  """NumPy reference of torch.nn.ConvTranspose1d (no bias): x (n, in), weight (in, out, k)."""
  n, k = x.shape[0], weight.shape[-1]
  out = np.zeros(((n - 1) * stride + k + output_padding, weight.shape[1]))
  for i in range(n):
    for j in range(k):
      out[i * stride + j] += x[i] @ weight[:, :, j]  # scatter: input i hits outputs i*s + j
  return out[padding:out.shape[0] - padding]


@pytest.mark.parametrize('n,k,s,p,op', [(4, 4, 2, 1, 0), (5, 3, 2, 1, 1), (3, 5, 3, 2, 0)])
def test_torch_padding_gives_torch_values(n, k, s, p, op):
  rng = np.random.RandomState(0)
  x, weight = rng.randn(n, 2), rng.randn(2, 3, k)  # 2 in, 3 out channels
  expected = torch_conv_transpose1d(x, weight, s, p, op)
  layer = nn.ConvTranspose(3, (k,), strides=(s,), padding=torch_padding(k, p, op, ndim=1),
                           use_bias=False, transpose_kernel=True)
  kernel = jnp.asarray(weight.transpose(2, 1, 0), jnp.float32)  # (k, out, in)
  y = layer.apply({'params': {'kernel': kernel}}, jnp.asarray(x[None], jnp.float32))[0]
  np.testing.assert_allclose(y, expected, atol=1e-5)


# ---------------------------------------------------------------- models


def test_upsampling_plan():
  assert upsampling_plan((28, 28, 1)) == (7, 7, 2)
  assert upsampling_plan((32, 32, 3)) == (4, 4, 3)
  assert upsampling_plan((64, 64, 3)) == (4, 4, 4)
  assert upsampling_plan((28, 32, 3)) == (7, 8, 2)
  assert upsampling_plan((6, 6, 1)) == (3, 3, 1)


@pytest.mark.parametrize('shape', [(27, 27, 1), (31, 32, 3), (4, 4, 1), (28, 28)])
def test_unreachable_image_shape_is_config_error(shape):
  with pytest.raises(ConfigError) as error:
    Decoder(image_shape=shape)
  assert '\n' not in str(error.value)


def test_base_width_too_small_is_config_error():
  with pytest.raises(ConfigError, match='base_width 4'):
    Generator(image_shape=(64, 64, 3), base_width=4)


def init_shapes(model, *args):
  return jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), *args))


@pytest.mark.parametrize('shape', [(28, 28, 1), (32, 32, 3)])
def test_decoder_and_generator_shapes(shape):
  z = jnp.zeros((2, Z))
  out, _ = init_shapes(Decoder(image_shape=shape, base_width=16), z)
  assert out.shape == (2, *shape) and out.dtype == jnp.float32
  out, _ = init_shapes(Generator(image_shape=shape, base_width=16), z)
  assert out.shape == (2, *shape)
  out, _ = init_shapes(Generator(image_shape=shape, base_width=16, num_classes=5), z,
                       jnp.zeros((2,), jnp.int32))
  assert out.shape == (2, *shape)
  fmap = jnp.zeros((2, 3, 3, 4))  # an encoder's feature map also works
  out, _ = init_shapes(Decoder(image_shape=shape, base_width=16, output_activation='sigmoid'), fmap)
  assert out.shape == (2, *shape)


def test_parameter_counts():
  # Written out from the architectures; no biases before BatchNorm.
  g = Generator(image_shape=(32, 32, 3), base_width=16)  # 4x4x16 -> 8x8x8 -> 16x16x4 -> 32x32x3
  expected = (Z * 4 * 4 * 16 + 2 * 16 + 4 * 4 * 16 * 8 + 2 * 8 + 4 * 4 * 8 * 4 + 2 * 4
              + 4 * 4 * 4 * 3 + 3)
  assert count_params(init_shapes(g, jnp.zeros((1, Z)))[1]['params']) == expected
  d = Discriminator(base_width=8)  # 32 -> 16x16x8 -> 8x8x16 -> 4x4x32 -> 1
  expected = (4 * 4 * 3 * 8 + 8 + 4 * 4 * 8 * 16 + 2 * 16 + 4 * 4 * 16 * 32 + 2 * 32
              + 4 * 4 * 32 + 1)
  assert count_params(init_shapes(d, jnp.zeros((1, 32, 32, 3)))[1]['params']) == expected
  # Conditional: one-hot labels widen the generator's input and the discriminator's.
  dc = Discriminator(base_width=8, num_classes=5)
  variables = init_shapes(dc, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32))[1]
  assert count_params(variables['params']) == expected + 4 * 4 * 5 * 8


def test_generator_label_checks():
  with pytest.raises(ConfigError, match='needs labels'):
    init_shapes(Generator(image_shape=(8, 8, 1), base_width=4, num_classes=3), jnp.zeros((1, Z)))
  with pytest.raises(ConfigError, match='takes no labels'):
    init_shapes(Discriminator(base_width=4), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))


@pytest.mark.parametrize('shape', [(28, 28, 1), (32, 32, 3)])
def test_discriminator_logits_shape(shape):
  logits, _ = init_shapes(Discriminator(base_width=8), jnp.zeros((5, *shape)))
  assert logits.shape == (5,) and logits.dtype == jnp.float32
  logits, _ = init_shapes(Discriminator(base_width=8, num_classes=3, dtype=jnp.bfloat16),
                          jnp.zeros((5, *shape)), jnp.zeros((5,), jnp.int32))
  assert logits.shape == (5,) and logits.dtype == jnp.float32


def test_summary_of_generator_and_discriminator():
  g = Generator(image_shape=(32, 32, 3), base_width=16, num_classes=4)
  table = str(summarize(g, (Z,), call_kwargs={'labels': jnp.zeros((1,), jnp.int32)}))
  assert 'deconv3 (ConvTranspose)' in table and '(None, 32, 32, 3)' in table
  table = str(summarize(Discriminator(base_width=8), (32, 32, 3)))
  assert 'head (Dense)' in table and '(None, 1)' in table


# ---------------------------------------------------------------- training


@pytest.fixture(scope='module')
def shapes_batch():
  """8 `shapes` images in [-1, 1] (B, 32, 32, 3) and their labels."""
  data = load_dataset('shapes', num_train=8, num_test=8, seed=0)
  images, labels = data.train
  return gan.to_unit_range(images), jnp.asarray(labels), data.num_classes


LR = 0.1  # SGD step of the unconditional state, so updates are -LR * gradient


SMALL = (16, 16, 3)  # the unconditional tests' images: shapes, 2x2-average-pooled


def small_images(images):
  return images.reshape(-1, 16, 2, 16, 2, 3).mean((2, 4))  # (B, 16, 16, 3)


@pytest.fixture(scope='module')
def uncond_state():
  """Unconditional DCGAN for SMALL images, tiny widths, SGD(LR) for both networks."""
  g = Generator(image_shape=SMALL, base_width=16)
  d = Discriminator(base_width=8)
  return gan.create_gan_state(g, d, SMALL, Z, key(), g_tx=optax.sgd(LR), d_tx=optax.sgd(LR))


def run_steps(state, images, labels, num_steps=3):
  """num_steps jitted updates; returns the new state and each step's metrics."""
  step = jax.jit(gan.gan_train_step)
  history = []
  for i in range(num_steps):
    state, metrics = step(state, images, labels, jax.random.fold_in(key(1), i))
    history.append(jax.device_get(metrics))
  return state, history


def assert_all_changed(old, new):
  for name in ('params', 'batch_stats'):
    for net in ('g', 'd'):
      changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), getattr(getattr(old, net), name),
                             getattr(getattr(new, net), name))
      assert all(jax.tree.leaves(changed)), (net, name, changed)  # every leaf moved


def assert_sane(history):
  for metrics in history:
    assert set(metrics) == {'d_loss', 'g_loss', 'd_real', 'd_fake', 'd_grad_norm', 'g_grad_norm',
                            'status'}
    assert int(metrics['status']) == 0  # applied
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert 0 < metrics['d_real'] < 1 and 0 < metrics['d_fake'] < 1


def test_dcgan_init(uncond_state):
  g, d = uncond_state.g.params, uncond_state.d.params
  kernels = {'d/conv1': d['conv1']['kernel'], 'd/conv2': d['conv2']['kernel'],
             'g/project': g['decoder']['project']['kernel'],
             'g/deconv1': g['decoder']['deconv1']['kernel']}
  for name, kernel in kernels.items():  # 384 to 2048 draws from N(0, 0.02)
    kernel = np.asarray(kernel)
    assert abs(kernel.std() - 0.02) < 0.003 and abs(kernel.mean()) < 0.003, name
  scale = np.concatenate([d['bn2']['scale'], g['decoder']['project_bn']['scale'],
                          g['decoder']['bn1']['scale']])  # 40 draws from N(1, 0.02)
  assert abs(scale.mean() - 1.0) < 0.01 and 0.01 < scale.std() < 0.03
  assert 'bn1' not in d  # no BatchNorm on the discriminator's first layer


def test_gan_train_steps_unconditional(shapes_batch, uncond_state):
  images, labels, _ = shapes_batch
  state, history = run_steps(uncond_state, small_images(images), labels)
  assert_sane(history)
  assert int(state.step) == 3 and int(state.d.step) == 3
  assert_all_changed(uncond_state, state)
  samples = gan.generate(state, jax.random.normal(key(2), (4, Z)))
  assert samples.shape == (4, *SMALL) and bool(jnp.all(jnp.abs(samples) <= 1))
  assert float(samples.std()) > 0


@pytest.mark.parametrize('d_augment', [False, True])
def test_gan_train_step_gradients_match_reference(shapes_batch, uncond_state, d_augment):
  """With SGD(LR), each update is -LR * the gradient of the loss written out directly.
  With d_augment, D sees every image shifted by up to 16 / 8 = 2 pixels, and G's
  gradient flows back through the shift of its fakes."""
  from jdl.data.pipeline import random_translate
  images, rng, state = small_images(shapes_batch[0]), key(3), uncond_state
  new, metrics = jax.jit(gan.gan_train_step, static_argnames='d_augment')(
      state, images, None, rng, d_augment=d_augment)
  see = ((lambda x, stream: random_translate(jax.random.fold_in(rng, stream), x, 2))
         if d_augment else (lambda x, stream: x))
  g_mod = Generator(image_shape=SMALL, base_width=16)
  d_mod = Discriminator(base_width=8)
  bce = optax.sigmoid_binary_cross_entropy
  z = jax.random.normal(rng, (8, Z), jnp.float32)

  def d_apply(params, stats, x):
    return d_mod.apply({'params': params, 'batch_stats': stats}, x, train=True,
                       mutable=['batch_stats'])

  def g_apply(params, stats):
    return g_mod.apply({'params': params, 'batch_stats': stats}, z, train=True,
                       mutable=['batch_stats'])[0]

  @jax.jit
  def reference(state, d_new_params):
    fake = g_apply(state.g.params, state.g.batch_stats)
    def d_loss(p):
      real_logits, upd = d_apply(p, state.d.batch_stats, see(images, 1))
      fake_logits, _ = d_apply(p, upd['batch_stats'], see(fake, 2))
      return bce(real_logits, 1.0).mean() + bce(fake_logits, 0.0).mean()
    def g_loss(p):  # -log D(G(z)) with the updated discriminator
      logits, _ = d_apply(d_new_params, state.d.batch_stats, see(g_apply(p, state.g.batch_stats), 3))
      return jnp.mean(jax.nn.softplus(-logits))
    return (jax.value_and_grad(d_loss)(state.d.params),
            jax.value_and_grad(g_loss)(state.g.params))

  (d_loss, d_grads), (g_loss, g_grads) = reference(state, new.d.params)
  np.testing.assert_allclose(metrics['d_loss'], d_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['g_loss'], g_loss, rtol=1e-5)
  for old, updated, grads in [(state.d.params, new.d.params, d_grads),
                              (state.g.params, new.g.params, g_grads)]:
    jax.tree.map(lambda o, n, g: np.testing.assert_allclose(n, o - LR * g, atol=1e-6),
                 old, updated, grads)


def test_gan_train_steps_conditional(shapes_batch):
  """Class-conditional, Adam (the default), on grey SMALL images."""
  images, labels, num_classes = shapes_batch
  images = small_images(images).mean(-1, keepdims=True)  # (8, 16, 16, 1)
  g = Generator(image_shape=(16, 16, 1), base_width=16, num_classes=num_classes)
  d = Discriminator(base_width=8, num_classes=num_classes)
  state = gan.create_gan_state(g, d, (16, 16, 1), Z, key())
  new, history = run_steps(state, images, labels)
  assert_sane(history)
  assert_all_changed(state, new)
  z = jax.random.normal(key(2), (4, Z))
  samples = gan.generate(new, z, labels[:4])
  assert samples.shape == (4, 16, 16, 1) and bool(jnp.all(jnp.abs(samples) <= 1))
  other = gan.generate(new, z, (labels[:4] + 1) % num_classes)
  assert float(jnp.abs(samples - other).max()) > 0  # the label changes the image
  with pytest.raises(ConfigError, match='needs labels'):
    gan.generate(new, z)


def test_create_gan_state_checks():
  g = Generator(image_shape=(16, 16, 1), base_width=8, num_classes=3)
  with pytest.raises(ConfigError, match='num_classes'):
    gan.create_gan_state(g, Discriminator(base_width=4), (16, 16, 1), Z, key())
  g = Generator(image_shape=(16, 16, 1), base_width=8)
  with pytest.raises(ConfigError, match='image_shape'):
    gan.create_gan_state(g, Discriminator(base_width=4), (32, 32, 1), Z, key())


# ---------------------------------------------------------------- pixels and grids


def test_pixel_ranges():
  pixels = np.array([0, 1, 127, 128, 254, 255], np.uint8)
  unit = np.asarray(gan.to_unit_range(pixels))
  np.testing.assert_allclose(unit[[0, -1]], [-1.0, 1.0])
  np.testing.assert_array_equal(gan.to_uint8(unit), pixels)
  np.testing.assert_array_equal(gan.to_uint8(np.array([-3.0, 3.0])), [0, 255])


@pytest.mark.parametrize('channels', [1, 3])
def test_save_image_grid(tmp_path, channels):
  images = np.random.RandomState(0).uniform(-1, 1, (10, 8, 6, channels)).astype(np.float32)
  path = gan.save_image_grid(images, str(tmp_path / 'sub' / 'grid.png'), nrow=4)
  with Image.open(path) as png:
    assert png.size == (4 * (6 + 2) + 2, 3 * (8 + 2) + 2)  # (width, height): 4 cols, 3 rows
    assert png.mode == ('L' if channels == 1 else 'RGB')
    grid = np.asarray(png).reshape(png.size[1], png.size[0], channels)
  expected = gan.to_uint8(images)
  np.testing.assert_array_equal(grid[2:10, 2:8], expected[0])
  np.testing.assert_array_equal(grid[12:20, 10:16], expected[5])  # row 1, column 1
  assert grid[0].max() == 0  # border


# ---------------------------------------------------------------- Fréchet distance


def reference_frechet(a, b):
  """The formula as written, with scipy's general matrix square root."""
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = np.real(scipy.linalg.sqrtm(cov_a @ cov_b))
  return np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root)


def test_frechet_distance():
  rng = np.random.RandomState(0)
  a = rng.randn(500, 6) @ rng.randn(6, 6)  # correlated features
  b = rng.randn(400, 6) * 2.0 + 0.5
  assert gan.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
  # Same covariance, mean shifted by d: exactly ||d||².
  d = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 0.25])
  assert gan.frechet_distance(a, a + d) == pytest.approx(np.sum(d ** 2), rel=1e-9)
  # Grows monotonically with the shift.
  distances = [gan.frechet_distance(a, a + t * d) for t in (0.0, 0.5, 1.0, 2.0, 4.0)]
  assert all(x < y for x, y in zip(distances, distances[1:]))
  # Scaled copy: S_b = c² S_a, so d² = (1 - c)² Tr(S_a) + ||mu_a - c mu_a||².
  c = 1.5
  closed = (1 - c) ** 2 * (np.trace(np.cov(a, rowvar=False)) + np.sum(a.mean(0) ** 2))
  assert gan.frechet_distance(a, c * a) == pytest.approx(closed, rel=1e-8)
  # Symmetric, and equal to the formula with scipy's sqrtm.
  assert gan.frechet_distance(a, b) == pytest.approx(gan.frechet_distance(b, a), rel=1e-9)
  assert gan.frechet_distance(a, b) == pytest.approx(reference_frechet(a, b), rel=1e-8)
  with pytest.raises(ConfigError):
    gan.frechet_distance(a, b[:, :3])


def test_acgan_class_head_and_its_loss_terms(shapes_batch):
  """The class head's shapes and parameters, and its loss terms against a by-hand cross-entropy."""
  images, labels, num_classes = shapes_batch
  images = small_images(images).mean(-1, keepdims=True)  # (8, 16, 16, 1)
  plain = Discriminator(base_width=8, num_classes=num_classes, conditioning='projection')
  headed = Discriminator(base_width=8, num_classes=num_classes, conditioning='projection',
                         class_head=True)
  variables = headed.init(key(), images, labels)
  logits, class_logits = headed.apply(variables, images, labels)
  assert logits.shape == (8,) and class_logits.shape == (8, num_classes)
  # The class head sees the image only: another label moves the real/fake logit, not the class logits.
  other_logits, other_class_logits = headed.apply(variables, images, (labels + 1) % num_classes)
  np.testing.assert_array_equal(other_class_logits, class_logits)
  assert not np.allclose(other_logits, logits)
  with pytest.raises(ConfigError, match="class_head needs conditioning='projection'"):
    init_shapes(Discriminator(base_width=8, num_classes=num_classes, class_head=True), images, labels)
  # 'none' (AC-GAN proper): the label reaches D only through the class loss.
  acgan = Discriminator(base_width=8, num_classes=num_classes, conditioning='none', class_head=True)
  acgan_variables = acgan.init(key(), images, labels)
  out = acgan.apply(acgan_variables, images, labels)
  assert count_params(acgan_variables['params']) == count_params(variables['params']) - sum(
      p.size for p in jax.tree.leaves(variables['params']['label_embed']))
  other = acgan.apply(acgan_variables, images, (labels + 1) % num_classes)
  jax.tree.map(np.testing.assert_array_equal, other, out)
  with pytest.raises(ConfigError, match="conditioning='none' needs a class_head"):
    init_shapes(Discriminator(base_width=8, num_classes=num_classes, conditioning='none'), images, labels)
  plain_params = count_params(init_shapes(plain, images, labels)[1]['params'])
  features = 4 * 4 * 16  # 16 -> 8x8x8 -> 4x4x16 (stops at side 4), flattened
  assert count_params(variables['params']) == plain_params + features * num_classes + num_classes
  with pytest.raises(ConfigError, match='class_head needs num_classes'):
    init_shapes(Discriminator(base_width=8, class_head=True), images)

  g = Generator(image_shape=(16, 16, 1), base_width=16, num_classes=num_classes)
  state = gan.create_gan_state(g, headed, (16, 16, 1), Z, key())
  step = jax.jit(gan.gan_train_step, static_argnames=('real_label', 'class_weight'))
  _, without = step(state, images, labels, key(1), class_weight=0.0)
  new, with_class = step(state, images, labels, key(1), class_weight=0.5)
  # D's loss gains 0.5 * the cross-entropy of its class logits on the real images
  # (train mode, before its update), computed here by hand from a log-softmax.
  out, _ = state.d.apply_fn({'params': state.d.params, 'batch_stats': state.d.batch_stats}, images,
                            labels, train=True, mutable=['batch_stats'])
  class_logits = np.asarray(out[1], np.float64)
  log_p = class_logits - np.log(np.exp(class_logits).sum(-1, keepdims=True))
  cross_entropy = -log_p[np.arange(8), np.asarray(labels)].mean()
  np.testing.assert_allclose(with_class['d_loss'] - without['d_loss'], 0.5 * cross_entropy, rtol=1e-4)
  predicted = class_logits.argmax(-1) == np.asarray(labels)
  assert float(with_class['d_class_acc_real']) == pytest.approx(predicted.mean())
  assert 0 <= float(with_class['d_class_acc_fake']) <= 1
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), state.d.params['class_head'],
                       new.d.params['class_head'])
  assert all(jax.tree.leaves(moved))


@pytest.mark.parametrize('kernel_size', [2, 3, 4, 5])
@pytest.mark.parametrize('height, width', [(1, 1), (4, 7)])
def test_conv_transpose_2x_equals_flax_conv_transpose(kernel_size, height, width):
  """The CPU's stand-in for the decoder's transposed convolution (jdl.ops'
  conv_transpose kernel): same init, outputs and gradients as Flax's."""
  from jdl.ops.conv import ConvTranspose
  x = jax.random.normal(key(3), (2, height, width, 3))
  flax_layer = nn.ConvTranspose(5, (kernel_size, kernel_size), strides=(2, 2), padding='SAME')
  layer = ConvTranspose(5, (kernel_size, kernel_size), strides=(2, 2), padding='SAME')
  variables = flax_layer.init(key(0), x)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(layer.init(key(0), x))):
    np.testing.assert_array_equal(a, b)
  cotangent = jax.random.normal(key(4), (2, 2 * height, 2 * width, 5))
  loss = lambda apply: lambda v, x: jnp.sum(apply(v, x) * cotangent)
  expected, expected_grads = jax.value_and_grad(loss(flax_layer.apply), (0, 1))(variables, x)
  got, got_grads = jax.value_and_grad(loss(layer.apply), (0, 1))(variables, x)
  np.testing.assert_allclose(layer.apply(variables, x), flax_layer.apply(variables, x), atol=1e-5)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)



def test_projection_discriminator(shapes_batch):
  """Projection conditioning: no label channels, one embedding row per class, and
  the logit gains exactly <embed[label], features>."""
  images, labels, num_classes = shapes_batch
  images = small_images(images).mean(-1, keepdims=True)  # (8, 16, 16, 1)
  unconditional = Discriminator(base_width=8)
  projected = Discriminator(base_width=8, num_classes=num_classes, conditioning='projection')
  variables = projected.init(key(), images, labels)
  params = dict(variables['params'])
  embed = params.pop('label_embed')['embedding']
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, unconditional.init(key(), images)['params'])
  assert embed.shape == (num_classes, 4 * 4 * 16)  # 16 -> 8x8x8 -> 4x4x16, flattened
  bare = unconditional.apply({'params': params, 'batch_stats': variables['batch_stats']}, images)
  # By hand: with every row zero but embed[c] = 2 * head kernel, <embed[c], features>
  # is 2 * (head(features) - head bias), and 0 for the other classes.
  c = int(labels[0])
  rows = jnp.zeros_like(embed).at[c].set(2 * params['head']['kernel'][:, 0])
  out = projected.apply({'params': {**params, 'label_embed': {'embedding': rows}},
                         'batch_stats': variables['batch_stats']}, images, labels)
  expected = jnp.where(labels == c, bare + 2 * (bare - params['head']['bias'][0]), bare)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ConfigError, match='conditioning must be one of input, projection, none'):
    Discriminator(base_width=8, num_classes=3, conditioning='both').init(key(), images, labels % 3)


def test_multiply_conditioned_generator():
  """'multiply': z * embed[label] feeds the same decoder an unconditional
  generator has, so each label gives another image from the same z."""
  num_classes = 4
  z = jax.random.normal(key(), (3, Z))
  labels = jnp.array([0, 1, 3], jnp.int32)
  unconditional = Generator(image_shape=(16, 16, 1), base_width=8)
  multiply = Generator(image_shape=(16, 16, 1), base_width=8, num_classes=num_classes,
                       conditioning='multiply')
  variables = multiply.init(key(), z, labels)
  params = dict(variables['params'])
  embed = params.pop('label_embed')['embedding']
  assert embed.shape == (num_classes, Z)  # and the decoder's Dense takes Z inputs, not Z + K
  assert (jax.tree.map(np.shape, params)
          == jax.tree.map(np.shape, unconditional.init(key(), z)['params']))
  out = multiply.apply(variables, z, labels)
  expected = unconditional.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                 z * embed[labels])
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  # Already at init another label moves the image about as far as another z does.
  z = jax.random.normal(key(), (64, Z))
  labels = jnp.arange(64, dtype=jnp.int32) % num_classes
  out = multiply.apply(variables, z, labels)
  label_change = jnp.abs(multiply.apply(variables, z, (labels + 1) % num_classes) - out).mean()
  z_change = jnp.abs(multiply.apply(variables, jnp.roll(z, 1, axis=0), labels) - out).mean()
  assert float(label_change) > 0.8 * float(z_change)  # 1.02 here; 0.46 with concat
  with pytest.raises(ConfigError, match="conditioning must be one of concat, multiply, batchnorm"):
    Generator(image_shape=(16, 16, 1), base_width=8, num_classes=3, conditioning='both')


def test_batchnorm_conditioned_generator():
  """'batchnorm': every BatchNorm's scale and offset become per-class tables.
  Tiled with an unconditional generator's own scale and bias, it computes that
  generator exactly (train and eval mode); a changed row changes only the
  images of that class."""
  num_classes = 4
  z = jax.random.normal(key(), (6, Z))
  labels = jnp.array([0, 1, 2, 3, 0, 2], jnp.int32)
  unconditional = Generator(image_shape=(16, 16, 1), base_width=8)
  conditional = Generator(image_shape=(16, 16, 1), base_width=8, num_classes=num_classes,
                          conditioning='batchnorm')
  plain = unconditional.init(key(1), z)
  variables = conditional.init(key(2), z, labels)
  decoder = dict(plain['params']['decoder'])
  stats = dict(plain['batch_stats']['decoder'])
  norms = [name for name in decoder if 'bn' in name]
  assert sorted(norms) == sorted(variables['batch_stats']['decoder']) and len(norms) == 2
  for name in norms:  # the plain BatchNorm's (C,) scale and bias, tiled to (K, C) tables
    table = variables['params']['decoder'][name]
    assert table['scale']['embedding'].shape == (num_classes,) + decoder[name]['scale'].shape
    decoder[name] = {'scale': {'embedding': jnp.tile(decoder[name]['scale'], (num_classes, 1))},
                     'offset': {'embedding': jnp.tile(decoder[name]['bias'], (num_classes, 1))}}
    stats[name] = {'norm': stats[name]}
  tiled = {'params': {'decoder': decoder}, 'batch_stats': {'decoder': stats}}
  assert jax.tree.map(np.shape, tiled) == jax.tree.map(np.shape, variables)
  np.testing.assert_allclose(conditional.apply(tiled, z, labels), unconditional.apply(plain, z),
                             rtol=1e-6, atol=1e-6)
  (out, new_stats), (expected, expected_stats) = (
      conditional.apply(tiled, z, labels, train=True, mutable=['batch_stats']),
      unconditional.apply(plain, z, train=True, mutable=['batch_stats']))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_stats['batch_stats']['decoder']['bn1']['norm']['var'],
                             expected_stats['batch_stats']['decoder']['bn1']['var'], rtol=1e-5)
  # Class 2's row of the first scale table doubled: only the label-2 images change (eval mode).
  scale = decoder['project_bn']['scale']['embedding']
  edited = dict(decoder, project_bn=dict(decoder['project_bn'],
                                          scale={'embedding': scale.at[2].multiply(2.0)}))
  changed = np.abs(np.asarray(conditional.apply(tiled, z, labels) - conditional.apply(
      {'params': {'decoder': edited}, 'batch_stats': {'decoder': stats}}, z, labels))).max(axis=(1, 2, 3))
  np.testing.assert_array_equal(changed > 0, np.asarray(labels) == 2)  # (tiny: N(0, 0.02) kernels)
  with pytest.raises(ConfigError, match='decoder with num_classes=4 needs labels'):
    Decoder(image_shape=(16, 16, 1), base_width=8, num_classes=4).init(key(), z)


def test_label_report_sees_an_ignored_label():
  """A 'multiply' generator whose label embedding is all ones ignores its label:
  label_effect is exactly 0 and every row of the confusion matrix is the same;
  with the embedding as initialised the label moves the images."""
  num_classes = 3
  g = Generator(image_shape=(16, 16, 1), base_width=8, num_classes=num_classes,
                conditioning='multiply')
  state = gan.create_gan_state(g, Discriminator(base_width=4, num_classes=num_classes),
                               (16, 16, 1), Z, key())
  # A stand-in scorer: 'class' = which third of the range the image's mean pixel is in.
  scorer = lambda images: (None, np.digitize(images.mean(axis=(1, 2, 3)), [-1e-4, 1e-4]))
  report = gan.label_report(state, scorer, key(5), per_class=20)
  assert report['label_effect'] > 0 and report['noise_effect'] > 0
  ones = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.ones_like(p) if 'label_embed' in jax.tree_util.keystr(path) else p,
      state.g.params)
  ignored = gan.label_report(state.replace(g=state.g.replace(params=ones)), scorer, key(5), per_class=20)
  confusion = np.array(ignored['confusion'])
  assert ignored['label_effect'] == 0.0 and (confusion == confusion[0]).all()
  assert confusion.shape == (3, 3) and confusion.sum() == 60
  assert ignored['match_rate'] == pytest.approx(np.trace(confusion) / 60)
