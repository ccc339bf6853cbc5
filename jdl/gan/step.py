"""The GAN's state and update step: both networks, one pure step, sampling.

  GANState            the generator's and the discriminator's TrainStates
                      (params, batch_stats, optimizer state, step): one pytree.
  create_gan_state    initialises both networks; make_optimizers gives DCGAN's
                      Adam(2e-4, b1=0.5) for each.
  gan_train_step      one pure, jittable update of D, then of G.
  generate            images from latent vectors (BatchNorm in eval mode).
"""
import functools
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jdl import losses
from jdl.data import pipeline
from jdl.errors import ConfigError
from jdl.core import TrainState, step_status


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
    loss = (losses.binary_cross_entropy(real_logits, jnp.full_like(real_logits, real_label)).mean()
            + losses.binary_cross_entropy(fake_logits, jnp.zeros_like(fake_logits)).mean())
    if real_classes is not None:
      loss = loss + class_weight * losses.softmax_cross_entropy(real_classes, labels).mean()
    return loss, (real_logits, fake_logits, real_classes, stats)

  (d_loss, (real_logits, fake_logits, real_classes, d_stats)), d_grads = jax.value_and_grad(
      d_loss_fn, has_aux=True)(d.params)
  d = d.apply_gradients(grads=d_grads, batch_stats=d_stats)

  # Generator: -log D(G(z)) against the new D, backpropagated through G's pass.
  def g_loss_fn(images):
    out, _ = _apply_train(d, d.params, d.batch_stats, seen_by_d(images, 3), *extra)
    logits, classes = _split_logits(out)
    loss = losses.binary_cross_entropy(logits, jnp.ones_like(logits)).mean()
    if classes is not None:
      loss = loss + class_weight * losses.softmax_cross_entropy(classes, labels).mean()
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
  # One cond over the whole state rather than keep_if's select per leaf: D's
  # new parameters also feed G's pass, so their selects cannot fuse into the
  # optimizer's update as a classifier's do, and ran as ~60 extra passes; the
  # cond made the benchmark's dcgan step faster (A/B in BUILD_NOTES.md).
  kept = jax.lax.cond(ok, lambda: new, lambda: state)
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
