"""Training a GAN: state, the alternating update step, sampling and evaluation.

The pieces, top to bottom:
  GANState            the generator's and the discriminator's TrainStates
                      (params, batch_stats, optimizer state, step): one pytree.
  create_gan_state    initialises both networks; make_optimizers gives DCGAN's
                      Adam(2e-4, b1=0.5) for each.
  gan_train_step      one pure, jittable update of D, then of G.
  generate            images from latent vectors (BatchNorm in eval mode).
  to_unit_range, to_uint8, save_image_grid
                      pixel conversions and a PNG of samples.
  frechet_distance    distance between Gaussians fitted to two feature sets.

Images live in [-1, 1] throughout: the generator ends in tanh, and real images
must be scaled the same way (`to_unit_range`) before they reach the
discriminator.

    state = create_gan_state(Generator((32, 32, 3), 128), Discriminator(64),
                             (32, 32, 3), latent_dim=100, rng=key)
    step = jax.jit(gan_train_step, donate_argnums=0)
    state, metrics = step(state, to_unit_range(images), labels, rng)
"""
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jdl import parallel
from jdl.config import make_writable_dir, option
from jdl.data import pipeline
from jdl.errors import ConfigError, Interrupted
from jdl.models.decoder import DISCRIMINATOR_CONDITIONING, GENERATOR_CONDITIONING
from jdl.train import PRNG_IMPL, StepChecker, TrainState, keep_if, step_status


class GANState(struct.PyTreeNode):
  """Everything a GAN run updates, as one pytree.

  Attributes:
    g: the generator's TrainState (apply_fn, params, batch_stats, tx, opt_state,
      step).
    d: the discriminator's TrainState.
    latent_dim: Z, the width of the generator's input (static).
    num_classes: 0 for an unconditional GAN, else the number of labels both
      networks take (static).
  """
  g: TrainState
  d: TrainState
  latent_dim: int = struct.field(pytree_node=False)
  num_classes: int = struct.field(pytree_node=False, default=0)

  @property
  def step(self) -> jax.Array:
    """Updates done (each updates both networks once)."""
    return self.g.step


def make_optimizers(learning_rate: float = 2e-4, b1: float = 0.5, b2: float = 0.999
                    ) -> Tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """(generator, discriminator) optimizers: Adam(2e-4, b1=0.5) each, as DCGAN.

  Arguments:
    learning_rate: Adam's step size (per update; DCGAN used batch 128).
    b1: Adam's first-moment decay; 0.5 instead of 0.9 steadies GAN training.
    b2: Adam's second-moment decay.
  """
  return optax.adam(learning_rate, b1, b2), optax.adam(learning_rate, b1, b2)


def _label_args(labels, num_classes: int) -> tuple:
  """The label argument of a conditional network's call, none for an unconditional one."""
  return (labels,) if num_classes else ()


def create_gan_state(generator, discriminator, image_shape: Sequence[int], latent_dim: int,
                     rng, *, g_tx: Optional[optax.GradientTransformation] = None,
                     d_tx: Optional[optax.GradientTransformation] = None) -> GANState:
  """Initialises both networks and their optimizer states.

  Arguments:
    generator: a module called as generator(z, [labels], train=...) ->
      (B, *image_shape) images, e.g. `jdl.models.decoder.Generator`.
    discriminator: a module called as discriminator(images, [labels], train=...)
      -> (B,) logits, e.g. `jdl.models.decoder.Discriminator`.
    image_shape: (H, W, C) of the images.
    latent_dim: Z.
    rng: key for the initial parameters.
    g_tx, d_tx: optimizers; None means `make_optimizers()`'s.
  Raises:
    ConfigError: the two networks disagree on num_classes, or the generator
      does not make images of image_shape.
  """
  num_classes = getattr(generator, 'num_classes', 0)
  if getattr(discriminator, 'num_classes', 0) != num_classes:
    raise ConfigError(f'generator has num_classes={num_classes} but discriminator has '
                      f'num_classes={getattr(discriminator, "num_classes", 0)}')
  labels = jnp.zeros((1,), jnp.int32)
  g_args = (jnp.zeros((1, latent_dim)), *_label_args(labels, num_classes))
  d_args = (jnp.zeros((1, *image_shape)), *_label_args(labels, num_classes))
  images, _ = jax.eval_shape(functools.partial(generator.init_with_output, train=False),
                             rng, *g_args)  # traced only: fails before compiling
  if images.shape != (1, *image_shape):
    raise ConfigError(f'generator makes images of shape {tuple(images.shape[1:])}, '
                      f'not image_shape {tuple(image_shape)}')

  @jax.jit
  def init(rng):  # one compilation for both networks
    g_key, d_key = jax.random.split(rng)
    return (generator.init(g_key, *g_args, train=False),
            discriminator.init(d_key, *d_args, train=False))

  g_vars, d_vars = init(rng)
  default_g_tx, default_d_tx = make_optimizers()

  def train_state(model, variables, tx):
    return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                             batch_stats=variables.get('batch_stats'))
  return GANState(g=train_state(generator, g_vars, g_tx or default_g_tx),
                  d=train_state(discriminator, d_vars, d_tx or default_d_tx),
                  latent_dim=latent_dim, num_classes=num_classes)


def _apply_train(state: TrainState, params, batch_stats, *args):
  """A train-mode call: (output, new batch_stats), for nets with or without BatchNorm."""
  variables = {'params': params}
  if batch_stats is not None:
    variables['batch_stats'] = batch_stats
  out, updates = state.apply_fn(variables, *args, train=True, mutable=['batch_stats'])
  return out, updates.get('batch_stats', batch_stats)


def _split_logits(out):
  """(real/fake logits (B,), class logits (B, K) or None) of a discriminator's output."""
  return out if isinstance(out, tuple) else (out, None)


def gan_train_step(state: GANState, real_images, labels, rng, real_label: float = 1.0,
                   class_weight: float = 0.0, d_augment: bool = False
                   ) -> Tuple[GANState, Dict[str, jax.Array]]:
  """One GAN update: the discriminator, then the generator. Pure: jit it.

  One batch of z ~ N(0, 1) is drawn; G(z) is computed once, in train mode.
    1. D minimises the binary cross-entropy on logits with real -> 1 and
       G(z) -> 0 (real and fake go through D as separate batches, so each has
       its own BatchNorm statistics, as the DCGAN reference code does).
    2. G minimises the non-saturating loss -log sigmoid(D(G(z))) against the
       updated D; its gradient flows back through the same forward pass of G.
  G's BatchNorm statistics come from that forward pass; D's from step 1 (D's
  pass in step 2 uses batch statistics but does not update the running ones).

  Arguments:
    state: the GANState.
    real_images: (B, H, W, C) float32 in [-1, 1] (see `to_unit_range`).
    labels: (B,) int32 labels of the real images; used only by a conditional
      GAN, whose fakes are generated for the same labels. None is fine for an
      unconditional GAN.
    rng: key for z (e.g. fold_in(step_key, step)).
    real_label: D's target for real images; 0.9 is one-sided label smoothing
      (Salimans et al. 2016), which keeps D from becoming overconfident.
    class_weight: for a discriminator with a class head (AC-GAN): D also
      minimises class_weight * cross-entropy of its class logits on the real
      images' labels, and G class_weight * cross-entropy of D's class logits
      on its fakes against the labels they were made for. (Real images only
      for D's term: classifying fakes would teach D nothing about the classes.)
    d_augment: DiffAugment (Zhao et al. 2020): every image D sees, real or
      fake, in both updates, is first shifted by up to 1/8 of its side (zero
      fill), differentiably, so G's gradient flows through the shift. Keeps D
      from memorising a small training set (static).
  Returns:
    (new state, metrics): d_loss, g_loss, d_real = mean sigmoid(D(x)),
    d_fake = mean sigmoid(D(G(z))) before D's update, d_grad_norm, g_grad_norm,
    with a class head d_class_acc_real and d_class_acc_fake (the fraction of
    real images and of fakes its class head gives their label), and status
    (int32: 0 good, 1 non-finite loss, 2 non-finite gradients; a bad step is
    not applied).
  """
  g, d = state.g, state.d
  extra = _label_args(labels, state.num_classes)
  z = jax.random.normal(rng, (real_images.shape[0], state.latent_dim), jnp.float32)  # (B, Z)
  pad = max(1, max(real_images.shape[1:3]) // 8)  # pixels: 4 for 32x32 (DiffAugment's 1/8)

  def seen_by_d(images, stream: int):
    """The images as D sees them: augmented (own key per stream) or as they are."""
    if not d_augment:
      return images
    # No flips: D would accept mirrored fakes (a mirrored digit is not a digit).
    return pipeline.random_translate(jax.random.fold_in(rng, stream), images, pad)

  fake, g_vjp, g_stats = jax.vjp(
      lambda params: _apply_train(g, params, g.batch_stats, z, *extra), g.params, has_aux=True)

  # Discriminator: real -> 1, fake -> 0; G is held fixed.
  def d_loss_fn(params):
    real_out, stats = _apply_train(d, params, d.batch_stats, seen_by_d(real_images, 1), *extra)
    fake_out, stats = _apply_train(d, params, stats, seen_by_d(jax.lax.stop_gradient(fake), 2), *extra)
    (real_logits, real_classes), (fake_logits, _) = _split_logits(real_out), _split_logits(fake_out)
    loss = (optax.sigmoid_binary_cross_entropy(real_logits, jnp.full_like(real_logits, real_label)).mean()
            + optax.sigmoid_binary_cross_entropy(fake_logits, jnp.zeros_like(fake_logits)).mean())
    if real_classes is not None:
      loss = loss + class_weight * optax.softmax_cross_entropy_with_integer_labels(
          real_classes, labels).mean()
    return loss, (real_logits, fake_logits, real_classes, stats)

  (d_loss, (real_logits, fake_logits, real_classes, d_stats)), d_grads = jax.value_and_grad(
      d_loss_fn, has_aux=True)(d.params)
  d = d.apply_gradients(grads=d_grads, batch_stats=d_stats)

  # Generator: -log D(G(z)) against the new D, backpropagated through G's pass.
  def g_loss_fn(images):
    out, _ = _apply_train(d, d.params, d.batch_stats, seen_by_d(images, 3), *extra)
    logits, classes = _split_logits(out)
    loss = optax.sigmoid_binary_cross_entropy(logits, jnp.ones_like(logits)).mean()
    if classes is not None:
      loss = loss + class_weight * optax.softmax_cross_entropy_with_integer_labels(classes, labels).mean()
    return loss, classes

  (g_loss, fake_classes), image_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(fake)
  (g_grads,) = g_vjp(image_grads)
  g = g.apply_gradients(grads=g_grads, batch_stats=g_stats)

  metrics = {'d_loss': d_loss, 'g_loss': g_loss,
             'd_real': jax.nn.sigmoid(real_logits).mean(),
             'd_fake': jax.nn.sigmoid(fake_logits).mean(),
             'd_grad_norm': optax.global_norm(d_grads),
             'g_grad_norm': optax.global_norm(g_grads)}
  if real_classes is not None:
    # AC-GAN: how often D's class head is right on the real batch (before its
    # update) and on the fakes (after it): the second is what G is rewarded for.
    metrics['d_class_acc_real'] = (real_classes.argmax(-1) == labels).mean()
    metrics['d_class_acc_fake'] = (fake_classes.argmax(-1) == labels).mean()
  # A step with a non-finite loss or gradient in either network changes neither
  # (only the step counters move), as in jdl.train.train_step.
  ok, metrics['status'] = step_status(d_loss + g_loss, metrics['d_grad_norm'] + metrics['g_grad_norm'])
  new = state.replace(g=g, d=d)
  kept = keep_if(ok, new, state)
  return kept.replace(g=kept.g.replace(step=g.step), d=kept.d.replace(step=d.step)), metrics


@jax.jit
def generate(state: GANState, z, labels=None) -> jax.Array:
  """Images (B, H, W, C) float32 in [-1, 1] from z, BatchNorm in eval mode. Jitted.

  Arguments:
    state: the GANState.
    z: (B, latent_dim) latent vectors, usually N(0, 1).
    labels: (B,) int labels for a conditional GAN, else None.
  """
  if state.num_classes and labels is None:
    raise ConfigError(f'conditional GAN (num_classes={state.num_classes}) needs labels')
  variables = {'params': state.g.params}
  if state.g.batch_stats is not None:
    variables['batch_stats'] = state.g.batch_stats
  return state.g.apply_fn(variables, z, *_label_args(labels, state.num_classes), train=False)


# ----------------------------------------------------------------------------
# Pixels and image grids.
# ----------------------------------------------------------------------------

def to_unit_range(images) -> jax.Array:
  """uint8 images in [0, 255] -> float32 in [-1, 1], the generator's range."""
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
  """Images in [-1, 1] (values outside are clipped, NaN is drawn black) -> uint8 in [0, 255]."""
  images = np.nan_to_num(np.asarray(images, np.float32), nan=-1.0)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_image_grid(images, path: str, nrow: int = 8, padding: int = 2) -> str:
  """Writes images as one PNG grid, `nrow` images per row, black borders.

  The PNG is nrow*(W + padding) + padding pixels wide and
  rows*(H + padding) + padding high, rows = ceil(N / nrow) (nrow = min(nrow, N)),
  like torchvision's make_grid.

  Arguments:
    images: (N, H, W, C), C = 1 or 3; float in [-1, 1] or uint8.
    path: the PNG to write; parent folders are created.
    nrow: images per row.
    padding: border pixels between and around images.
  Returns:
    `path` (written by process 0 only).
  """
  from PIL import Image

  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ConfigError(f'image grid needs (N, H, W, 1 or 3) images, got shape {images.shape}')
  if images.dtype != np.uint8:
    images = to_uint8(images)
  n, height, width, channels = images.shape
  cols = max(1, min(nrow, n))
  rows = -(-n // cols)
  grid = np.zeros((rows * (height + padding) + padding, cols * (width + padding) + padding,
                   channels), np.uint8)
  for i, image in enumerate(images):
    top = padding + (i // cols) * (height + padding)
    left = padding + (i % cols) * (width + padding)
    grid[top:top + height, left:left + width] = image
  if parallel.is_primary():  # one writer in a multi-host run's shared workdir
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if channels == 1 else grid).save(path)
  return path


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------

def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  """Square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
  values, vectors = np.linalg.eigh(matrix)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))[None, :]) @ vectors.T


def frechet_distance(features_a, features_b) -> float:
  """Fréchet distance between Gaussians fitted to two feature sets.

      d² = ||mu_a - mu_b||² + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})

  with means mu and covariances S (unbiased, N - 1). Computed in float64:
  Tr((S_a S_b)^{1/2}) = Tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}), a symmetric PSD
  matrix whose square root comes from its eigenvalues, so there is no complex
  round-off to discard (scipy.linalg.sqrtm of S_a S_b agrees to ~1e-10).

  With features from Inception-v3's pool layer this is FID (Heusel et al.
  2017). With features from a jdl classifier (e.g. its 'pre_logits') it is a
  useful relative measure between models scored by the SAME feature network,
  but NOT comparable with published, Inception-based FID values.

  Arguments:
    features_a: (N, D) features of one sample, N >= 2.
    features_b: (M, D) features of the other, M >= 2.
  Returns:
    The squared distance d² (>= 0) as a Python float, as FID reports it.
  """
  a = np.asarray(features_a, np.float64)
  b = np.asarray(features_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
    raise ConfigError(f'frechet_distance needs (N, D) and (M, D) features with N, M >= 2, '
                      f'got {a.shape} and {b.shape}')
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # (D, D) each
  cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
  sqrt_a = _sqrt_psd(cov_a)
  middle = sqrt_a @ cov_b @ sqrt_a
  middle = (middle + middle.T) / 2  # symmetric up to round-off
  trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0.0, None)).sum()
  distance = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
  return float(max(distance, 0.0))


# ----------------------------------------------------------------------------
# The experiment: configuration, quality measure and loop.
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class GANConfig:
  """Everything that defines a DCGAN run."""
  dataset: str = option("shapes", "shapes or shapes_plain (built in, offline), mnist, fashion_mnist, cifar10 or another TFDS image dataset")
  data_dir: Optional[str] = option(None, "where TFDS data is looked for (TFDS default if unset)")
  download: bool = option(True, "allow TFDS to download and prepare a dataset that is not there")
  num_train: int = option(0, "training images: shapes generates this many, TFDS keeps the first N (0: default/all)")
  conditional: bool = option(False, "condition both networks on the class label")
  d_conditioning: str = option("projection", "conditional only: how D sees the label: input (one-hot "
                                         "channels on the image), none (only through the AC-GAN class "
                                         "head) or projection (label embedding dotted "
                                         "with D's last features, Miyato & Koyama 2018)")
  g_conditioning: str = option("concat", "conditional only: how G sees the label: concat (one-hot "
                                         "appended to z), multiply (z times a learned label embedding) or "
                                         "batchnorm (a BatchNorm scale and offset per class in every layer)")
  class_loss_weight: float = option(1.0, "conditional only: weight of an AC-GAN auxiliary class loss "
                                         "(D's extra head classifies real images; G is rewarded when it "
                                         "classifies a fake as the class asked for); 0: no class head")
  d_augment: bool = option(True, "DiffAugment: D sees every real and fake image randomly shifted "
                                  "(up to 1/8 of the side), differentiably")
  latent_dim: int = option(100, "width of the generator's input noise z ~ N(0, 1)")
  g_width: int = option(128, "generator: channels of the first feature map, halved per up-sampling")
  d_width: int = option(32, "discriminator: channels of the first convolution, doubled per down-sampling")
  learning_rate: float = option(2e-4, "Adam step size of both networks (DCGAN: 2e-4)")
  beta1: float = option(0.5, "Adam's first-moment decay (DCGAN: 0.5)")
  real_label: float = option(0.9, "discriminator's target for real images: 0.9 is one-sided label smoothing, 1.0 plain DCGAN")
  batch_size: int = option(64, "real images per step")
  epochs: int = option(10, "passes over the training images")
  classifier_workdir: Optional[str] = option(None, "an experiments.cifar workdir on the same dataset whose "
                                            "classifier scores samples (default: train a cnn in WORKDIR/classifier)")
  classifier_epochs: int = option(30, "epochs of the scoring cnn when jdl trains it (Adam, cosine "
                                     "schedule, augmentation)")
  num_eval: int = option(1000, "real and generated images compared by the Fréchet distance each epoch")
  seed: int = option(0, "seed of initialisation, data order and noise")
  workdir: Optional[str] = option(None, "checkpoints, sample grids, metrics go here; rerunning resumes (default runs/gan-DATASET-seedS)")
  keep_checkpoints: int = option(2, "latest checkpoints kept for resume")
  nan_policy: str = option("stop", "on a non-finite loss or gradient: stop (naming the step) or skip "
                                   "the step (counted in metrics.jsonl); either way it is not applied")


def validate_config(config: GANConfig) -> None:
  """Raises ConfigError (one line) for a bad value, before anything loads."""
  def check(ok, message):
    if not ok:
      raise ConfigError(message)
  check(math.isfinite(config.learning_rate) and config.learning_rate > 0,
        f"learning_rate must be > 0, got {config.learning_rate}")
  check(0.0 <= config.beta1 < 1.0, f"beta1 must be in [0, 1), got {config.beta1}")
  check(math.isfinite(config.class_loss_weight) and config.class_loss_weight >= 0,
        f"class_loss_weight must be >= 0, got {config.class_loss_weight}")
  check(config.d_conditioning in DISCRIMINATOR_CONDITIONING,
        f"d_conditioning must be one of {', '.join(DISCRIMINATOR_CONDITIONING)}, "
        f"got {config.d_conditioning!r}")
  check(not (config.conditional and config.class_loss_weight > 0 and config.d_conditioning == "input"),
        "class_loss_weight > 0 needs --d_conditioning=projection or none: with input label channels "
        "D's class head reads the label off its input, not the image")
  check(not (config.conditional and config.class_loss_weight == 0 and config.d_conditioning == "none"),
        "--d_conditioning=none needs class_loss_weight > 0: else nothing tells G what its label means")
  check(config.g_conditioning in GENERATOR_CONDITIONING,
        f"g_conditioning must be one of {', '.join(GENERATOR_CONDITIONING)}, got {config.g_conditioning!r}")
  check(0.5 < config.real_label <= 1.0, f"real_label must be in (0.5, 1], got {config.real_label}")
  for name in ("latent_dim", "g_width", "d_width", "batch_size", "keep_checkpoints",
               "classifier_epochs"):
    check(getattr(config, name) >= 1, f"{name} must be >= 1, got {getattr(config, name)}")
  check(config.num_eval >= 2, f"num_eval must be >= 2, got {config.num_eval}")
  check(config.epochs >= 0, f"epochs must be >= 0, got {config.epochs}")
  check(config.num_train >= 0, f"num_train must be >= 0, got {config.num_train}")
  check(config.nan_policy in ("stop", "skip"), f"nan_policy must be stop or skip, got {config.nan_policy!r}")
  check(not config.classifier_workdir
        or os.path.exists(os.path.join(config.classifier_workdir, "config.json")),
        f"--classifier_workdir {config.classifier_workdir} holds no experiments.cifar run "
        "(no config.json)")


class Scorer:
  """A trained jdl classifier that scores images: features for the Fréchet distance, labels.

  Images go through exactly the classifier's input path (uint8, then its
  training mean/std), so generated images in [-1, 1] are first rounded to uint8
  like real ones.
  """

  def __init__(self, state, mean, std):
    self.state = state

    @jax.jit
    def apply(state, images):
      if images.dtype != jnp.uint8:  # [-1, 1] floats -> the uint8 a PNG would hold
        images = jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
      variables = {"params": state.params}
      if state.batch_stats is not None:
        variables["batch_stats"] = state.batch_stats
      logits, features = state.apply_fn(variables, pipeline.normalize(images, mean, std), train=False)
      return features["pre_logits"], jnp.argmax(logits, -1)
    self._apply = apply

  def __call__(self, images, batch_size: int = 500) -> Tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, predicted labels (N,)) of images (N, H, W, C)."""
    out = [self._apply(self.state, images[i:i + batch_size])
           for i in range(0, len(images), batch_size)]
    return (np.concatenate([np.asarray(f) for f, _ in out]),
            np.concatenate([np.asarray(p) for _, p in out]))


def train_scorer(config: GANConfig, dataset, workdir: str, log=print,
                 devices=None) -> Tuple[Scorer, float]:
  """The scoring classifier: restored from --classifier_workdir or trained (cnn).

  Returns (scorer, its test accuracy).
  """
  from jdl import train
  from jdl.config import TrainConfig, load_run_config
  from jdl.data import split_validation
  # Batch 128 as experiments.cifar, fewer for tiny training sets (>= 2 steps an epoch).
  # Augmentation and a cosine schedule: on shapes_plain 30 such epochs give a
  # cnn 94.5% test accuracy against 79.6% for 8 plain ones (BUILD_NOTES.md,
  # issue 5), and a scorer that misreads real images misreads samples too.
  devices = list(devices) if devices is not None else jax.devices()
  batch_size = max(1, min(128, int(len(dataset.train[1]) * 0.9) // 2))
  if batch_size >= len(devices):  # a multiple of the device count, to be data parallel
    batch_size -= batch_size % len(devices)
  cnn_config = TrainConfig(dataset=config.dataset, data_dir=config.data_dir, model="cnn",
                           epochs=config.classifier_epochs, num_train=config.num_train,
                           batch_size=batch_size, augment=True, schedule="cosine",
                           seed=config.seed, workdir=config.classifier_workdir or os.path.join(workdir, "classifier"))
  if config.classifier_workdir:
    cnn_config, _ = load_run_config(config.classifier_workdir, "classifier_workdir")
    if cnn_config.dataset != config.dataset:
      raise ConfigError(f"--classifier_workdir {config.classifier_workdir} was trained on "
                        f"{cnn_config.dataset!r}, not {config.dataset!r}")
    # Its own directory wherever it now lies; a finished run only re-evaluates.
    cnn_config = dataclasses.replace(cnn_config, workdir=config.classifier_workdir)
  log(f"Scoring classifier: {cnn_config.model} in {cnn_config.workdir}")
  if cnn_config.batch_size % len(devices):  # a stored or tiny batch: one device
    devices = devices[:1]
  state, results = train.fit(cnn_config, dataset, devices=devices, log=lambda line: None)
  train_split, _ = split_validation(dataset.train, cnn_config.validation_fraction, cnn_config.seed)
  mean, std = pipeline.channel_stats(train_split[0])  # as jdl.train normalised its inputs
  return Scorer(state, mean, std), results["test_accuracy"]


def fixed_noise(config: GANConfig, num_classes: int, count: int = 64):
  """The grid's latent vectors (and labels: row-major, class i % num_classes), fixed per seed."""
  z = jax.random.normal(jax.random.key(config.seed + 1, impl=PRNG_IMPL), (count, config.latent_dim))
  labels = jnp.arange(count, dtype=jnp.int32) % max(num_classes, 1)
  return z, labels


def sample_quality(state: GANState, scorer: Scorer, real_features, key, count: int,
                   num_classes: int) -> Dict[str, float]:
  """Fréchet distance (classifier features) of `count` samples vs real test images.

  For a conditional GAN also the rate at which the classifier labels a sample
  with the class it was asked for.
  """
  z_key, label_key = jax.random.split(key)
  z = jax.random.normal(z_key, (count, state.latent_dim))
  labels = jax.random.randint(label_key, (count,), 0, max(num_classes, 1))
  images = np.concatenate([np.asarray(generate(state, z[i:i + 500],
                                               labels[i:i + 500] if state.num_classes else None))
                           for i in range(0, count, 500)])
  features, predicted = scorer(images)
  out = {"frechet_distance": frechet_distance(real_features, features)}
  if state.num_classes:
    out["label_match_rate"] = float(np.mean(predicted == np.asarray(labels)))
  return out


def label_report(state: GANState, scorer: Scorer, key, per_class: int = 200) -> Dict[str, Any]:
  """How a conditional generator uses its label.

  Every class is generated from the same `per_class` latent vectors, so the
  K sets of images differ only by the label.

  Returns:
    confusion: (K, K) counts as nested lists: row = the class asked for,
      column = the scoring classifier's label.
    match_rate: the confusion matrix's trace over its total.
    label_effect: mean |G(z, a) - G(z, b)| over class pairs a < b (pixels
      in [-1, 1]): how far another label moves an image.
    noise_effect: mean |G(z1, c) - G(z2, c)| between two halves of the z's:
      how far another z moves it. A label_effect far below noise_effect means
      the generator all but ignores its label.
  """
  num_classes = state.num_classes
  z = jax.random.normal(key, (per_class, state.latent_dim))
  images = np.stack([np.asarray(generate(state, z, jnp.full((per_class,), c, jnp.int32)))
                     for c in range(num_classes)])  # (K, per_class, H, W, C)
  confusion = np.stack([np.bincount(scorer(images[c])[1], minlength=num_classes)
                        for c in range(num_classes)])
  half = per_class // 2
  return {"confusion": confusion.tolist(),
          "match_rate": float(np.trace(confusion) / confusion.sum()),
          "label_effect": float(np.mean([np.abs(images[a] - images[b]).mean()
                                         for a in range(num_classes) for b in range(a + 1, num_classes)])),
          "noise_effect": float(np.abs(images[:, :half] - images[:, half:2 * half]).mean())}


def fit(config: GANConfig, dataset=None, *, devices=None, progress: bool = True, log=print) -> dict:
  """Trains a DCGAN as `config` says, resuming from its workdir.

  Each epoch: the step loop, a grid of samples from fixed noise (PNG and
  TensorBoard), and the Fréchet distance in the scoring classifier's feature
  space. Returns the dict also written to WORKDIR/results.json. With more
  than one device (`devices`, default all) each step is data parallel, as in
  jdl.train.fit: BatchNorm statistics and gradients are those of the whole
  batch.
  """
  from tqdm import tqdm
  from jdl import checkpoint
  from jdl.data import load_dataset
  from jdl.logs import MetricWriter, write_json
  from jdl.models.decoder import Discriminator, Generator
  from jdl.plots import plot_panels
  from jdl.summary import summarize
  from jdl.train import StopSignals

  start_time = time.time()
  validate_config(config)
  mesh = parallel.data_mesh(devices)
  parallel.check_batch_size(config.batch_size, mesh)
  if dataset is None:
    dataset = load_dataset(config.dataset, data_dir=config.data_dir, num_train=config.num_train or None,
                           seed=config.seed, download=config.download)
  if len(dataset.input_shape) != 3:
    raise ConfigError(f"a GAN needs images (H, W, C); {dataset.name} has inputs of shape {dataset.input_shape}")
  images, labels = dataset.train
  if config.batch_size > len(labels):
    raise ConfigError(f"batch_size {config.batch_size} is larger than the training set ({len(labels)} images)")
  num_classes = dataset.num_classes if config.conditional else 0
  generator = Generator(tuple(dataset.input_shape), config.g_width, num_classes=num_classes,
                        conditioning=config.g_conditioning)
  discriminator = Discriminator(config.d_width, num_classes=num_classes,
                                conditioning=config.d_conditioning,
                                class_head=bool(num_classes and config.class_loss_weight > 0))
  workdir = config.workdir or f"runs/gan-{config.dataset.replace('/', '_')}-seed{config.seed}"
  make_writable_dir(os.path.join(workdir, "samples"))
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      previous = json.load(f)
    previous.setdefault("g_conditioning", "concat")  # the only kind before it was a flag
    keys = ("dataset", "conditional", "g_width", "d_width", "latent_dim")
    if config.conditional:
      keys += ("d_conditioning", "g_conditioning")
    for key in keys:
      if previous.get(key) != getattr(config, key):
        raise ConfigError(f"workdir {workdir} holds a GAN run with {key}={previous.get(key)!r}, "
                          f"not {getattr(config, key)!r}; use another --workdir")
    if config.conditional and (previous.get("class_loss_weight", 0.0) > 0) != discriminator.class_head:
      # Any positive weight is the same network; 0 has no class head to restore.
      raise ConfigError(f"workdir {workdir} holds a GAN run with class_loss_weight="
                        f"{previous.get('class_loss_weight', 0.0)!r}, not {config.class_loss_weight!r} "
                        "(a class head in D only with a positive weight); use another --workdir")
  write_json(config_path, dataclasses.asdict(config))

  label_args = (jnp.zeros((1,), jnp.int32),) if num_classes else ()
  for name, module, shape in (("Generator", generator, (config.latent_dim,)),
                              ("Discriminator", discriminator, tuple(dataset.input_shape))):
    summary = summarize(module, shape, call_kwargs=({"labels": label_args[0]} if num_classes else None))
    log(f"{name} on {dataset.name} {dataset.input_shape}\n{summary}")

  scorer, classifier_accuracy = train_scorer(config, dataset, workdir, log, devices)
  eval_images = dataset.test[0][:config.num_eval]
  real_features, _ = scorer(eval_images)

  init_key, data_key, step_key, eval_key = jax.random.split(jax.random.key(config.seed, impl=PRNG_IMPL), 4)
  g_tx, d_tx = make_optimizers(config.learning_rate, config.beta1)
  state = create_gan_state(generator, discriminator, dataset.input_shape, config.latent_dim,
                           init_key, g_tx=g_tx, d_tx=d_tx)
  state = parallel.replicate(state, mesh)  # before restoring, which keeps these shardings
  parallel.announce(mesh, config.batch_size, log)
  _, batch_sharding = parallel.shardings(mesh)
  steps_per_epoch = len(labels) // config.batch_size
  ckpts = checkpoint.Checkpoints(workdir, config.keep_checkpoints)
  meta = {"epoch": 0, "step_in_epoch": 0, "partial_sums": None, "train_time_s": 0.0,
          "initial_quality": None}
  restored = ckpts.restore_latest(state)
  if restored is not None:
    state, saved = restored
    meta.update(saved)
    log(f"Resuming from {workdir}: epoch {meta['epoch']} done, step {int(state.step)}")
  if meta["initial_quality"] is None:  # the untrained generator, for reference
    meta["initial_quality"] = sample_quality(state, scorer, real_features, eval_key,
                                             len(eval_images), num_classes)
  writer = MetricWriter(workdir, meta["epoch"])
  data = parallel.replicate({"images": images, "labels": labels}, mesh)
  z_grid, labels_grid = fixed_noise(config, num_classes)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_fn(state, sums, data, order, index, step_key):
    batch_images, batch_labels = pipeline.take_batch(data["images"], data["labels"], order, index,
                                                     config.batch_size)
    batch_images, batch_labels = parallel.shard_batch((batch_images, batch_labels), batch_sharding)
    state, metrics = gan_train_step(state, to_unit_range(batch_images), batch_labels,
                                    jax.random.fold_in(step_key, state.step), config.real_label,
                                    config.class_loss_weight, config.d_augment)
    status = metrics.pop("status")
    bad = status > 0  # a skipped step's metrics stay out of the sums; it is counted
    sums = {k: sums[k] + (bad.astype(jnp.float32) if k == "skipped" else jnp.where(bad, 0.0, metrics[k]))
            for k in sums}
    return state, sums, status

  order_fn = jax.jit(pipeline.epoch_permutation, static_argnums=2)
  names = ("d_loss", "g_loss", "d_real", "d_fake", "d_grad_norm", "g_grad_norm", "skipped")
  if discriminator.class_head:
    names += ("d_class_acc_real", "d_class_acc_fake")
  with StopSignals() as stop:
    for epoch in range(meta["epoch"] + 1, config.epochs + 1):
      epoch_start = time.time()
      first_index = meta["step_in_epoch"]
      order = order_fn(data_key, epoch, len(labels))
      sums = {k: jnp.zeros((), jnp.float32) for k in names}
      if meta["partial_sums"]:
        sums = {k: jnp.asarray(meta["partial_sums"].get(k, 0.0), jnp.float32) for k in names}
      with tqdm(total=steps_per_epoch, initial=first_index, unit="step", desc=f"epoch {epoch}/{config.epochs}",
                disable=not progress, leave=False, file=sys.stderr, mininterval=0.5) as bar:
        checker = StepChecker(config.nan_policy, epoch, workdir, on_done=lambda: bar.update(1),
                              hint="Lower --learning_rate, or pass --nan_policy=skip to skip such steps")
        for index in range(first_index, steps_per_epoch):
          state, sums, status = train_fn(state, sums, data, order, index, step_key)
          checker.push(int(state.step), status)
          if (index + 1) % 20 == 0:
            bar.set_postfix(d_loss=f"{float(sums['d_loss']) / (index + 1 - first_index + 1e-9):.3f}")
          if stop.signum and index + 1 < steps_per_epoch:
            checker.flush()  # a bad step stops here, before its state could be saved
            meta.update(step_in_epoch=index + 1,
                        partial_sums={k: float(v) for k, v in jax.device_get(sums).items()})
            meta["train_time_s"] += time.time() - epoch_start
            ckpts.save_latest(int(state.step), state, meta)
            raise Interrupted(f"stopped by {signal.Signals(stop.signum).name} at step {int(state.step)} "
                              f"(epoch {epoch}); checkpoint saved in {workdir}; rerun the same command "
                              "to continue", stop.signum)
        checker.flush()
      sums = jax.device_get(sums)
      skipped = float(sums.pop("skipped"))
      row = {k: float(v) / max(steps_per_epoch - skipped, 1) for k, v in sums.items()}
      if config.nan_policy == "skip":
        row["skipped_steps"] = skipped
      meta["train_time_s"] += time.time() - epoch_start
      row.update(sample_quality(state, scorer, real_features, eval_key, len(eval_images), num_classes))
      row["epoch_time_s"] = time.time() - epoch_start
      grid = save_image_grid(generate(state, z_grid, labels_grid if num_classes else None),
                             os.path.join(workdir, "samples", f"epoch_{epoch:03d}.png"))
      writer.write(int(state.step), epoch, row)
      writer.add_image("samples", grid, int(state.step))
      meta.update(epoch=epoch, step_in_epoch=0, partial_sums=None)
      ckpts.save_latest(int(state.step), state, meta)
      log(f"epoch {epoch}/{config.epochs}  d_loss {row['d_loss']:.3f}  g_loss {row['g_loss']:.3f}  "
          f"D(x) {row['d_real']:.2f}  D(G(z)) {row['d_fake']:.2f}  Fréchet {row['frechet_distance']:.2f}"
          + (f"  label match {row['label_match_rate']:.1%}" if num_classes else "")
          + f"  {row['epoch_time_s']:.0f}s")
      if stop.signum and epoch < config.epochs:
        raise Interrupted(f"stopped by {signal.Signals(stop.signum).name} after epoch {epoch}; "
                          f"checkpoint saved in {workdir}; rerun the same command to continue", stop.signum)

  writer.close()
  ckpts.close()
  final_grid = save_image_grid(generate(state, z_grid, labels_grid if num_classes else None),
                               os.path.join(workdir, "samples", "final.png"))
  history = writer.history
  curves = None
  if history:
    panels = {"losses": ["d_loss", "g_loss"], "discriminator outputs": ["d_real", "d_fake"],
              "Fréchet distance (classifier features)": ["frechet_distance"]}
    if num_classes:
      panels["label match rate"] = ["label_match_rate"] + (
          ["d_class_acc_real", "d_class_acc_fake"] if discriminator.class_head else [])
    curves = plot_panels(history, os.path.join(workdir, "learning_curves.png"), panels,
                         title=f"DCGAN on {dataset.name}")
  fd = [r["frechet_distance"] for r in history]
  results = {
      "config": dataclasses.asdict(config),
      "dataset": {"name": dataset.name, "num_train": len(labels), "num_eval": len(eval_images)},
      "frechet_distance_note": ("Fréchet distance between Gaussians fitted to the scoring cnn's "
                                "pre_logits features of real test images and generated samples; "
                                "NOT comparable with Inception-based FID"),
      "scoring_classifier_test_accuracy": classifier_accuracy,
      "frechet_distance_initial": meta["initial_quality"]["frechet_distance"],
      "frechet_distance_by_epoch": fd,
      "frechet_distance_first_epoch": fd[0] if fd else None,
      "frechet_distance_last_epoch": fd[-1] if fd else None,
      "label_match_rate_last_epoch": history[-1].get("label_match_rate") if history else None,
      "label_match_chance": (1.0 / num_classes) if num_classes else None,
      "label_report": (label_report(state, scorer, jax.random.fold_in(eval_key, 1))
                       if num_classes and history else None),
      "final_losses": {k: history[-1][k] for k in ("d_loss", "g_loss", "d_real", "d_fake")} if history else None,
      "epochs_run": meta["epoch"],
      "train_time_s": meta["train_time_s"],
      "wall_time_s": time.time() - start_time,
      "samples": final_grid,
      "learning_curves": curves,
  }
  write_json(os.path.join(workdir, "results.json"), results)
  if fd:
    log(f"Fréchet distance {results['frechet_distance_initial']:.2f} untrained, {fd[0]:.2f} after epoch 1, "
        f"{fd[-1]:.2f} after epoch {meta['epoch']}"
        + (f"; label match {results['label_match_rate_last_epoch']:.1%} (chance {1 / num_classes:.0%})"
           if num_classes else "") + f"; results in {workdir}/results.json")
  return results
