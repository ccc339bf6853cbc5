"""Samples from a trained DCGAN: `python -m experiments.gan --sample_only`.

The generator is rebuilt from the run's config.json and restored from its
best checkpoint (the exported generator; the latest when no best was kept).
Neither the data nor the scoring classifier is loaded, and nothing is trained.
The noise comes from --seed alone, so the same seed draws the same picture.

    python -m experiments.gan --sample_only --workdir=runs/cgan --label=7 --num=64 --seed=3
    # -> runs/cgan/samples/label7_seed3.png
"""
import dataclasses
import json
import math
import os
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jdl import checkpoint
from jdl.core import PRNG_IMPL
from jdl.errors import ConfigError
from jdl.gan.config import GANConfig, validate_config
from jdl.gan.step import GANState, create_gan_state, generate, make_optimizers
from jdl.images import save_image_grid


def _train_first(workdir: str) -> str:
  return f"train one first: python -m experiments.gan --workdir={workdir}"


def read_run(workdir: str) -> Tuple[dict, GANConfig, int]:
  """(config.json record, the run's GANConfig, num_classes: 0 if unconditional)
  of the GAN run in `workdir`; ConfigError (one line) if it holds none."""
  from jdl.data import KNOWN_LABELS
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      record = json.load(f)
  except (OSError, ValueError):
    record = None
  if isinstance(record, dict) and record.get("task", "gan") != "gan":
    raise ConfigError(f"{workdir} holds a {record['task']} run, not a GAN run; " + _train_first(workdir))
  if not isinstance(record, dict) or "task" not in record:
    raise ConfigError(f"{workdir} holds no trained GAN (no config.json of experiments.gan); "
                      + _train_first(workdir))
  known = {f.name for f in dataclasses.fields(GANConfig)}
  trained = GANConfig(**{k: v for k, v in record.items() if k in known})
  num_classes = 0
  if trained.conditional:  # older records lack num_classes; KNOWN_LABELS has the built-ins'
    num_classes = record.get("num_classes") or KNOWN_LABELS.get(trained.dataset, (None, 0))[1]
  return record, trained, num_classes


def restore_generator(workdir: str) -> Tuple[GANState, dict, str, int]:
  """The trained GAN of `workdir`: (state, its config.json record, 'best' or
  'latest', the epoch it was saved after). Nothing in `workdir` is changed.

  Raises:
    ConfigError: one line, when `workdir` holds no GAN run or no checkpoint.
  """
  from jdl.gan.loop import build_networks
  record, trained, num_classes = read_run(workdir)
  directory = os.path.join(workdir, "checkpoints")
  if not (os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))):
    raise ConfigError(f"{workdir} has no checkpoint yet; " + _train_first(workdir))
  generator, discriminator = build_networks(trained, record["input_shape"], num_classes)
  g_tx, d_tx = make_optimizers(trained.learning_rate, trained.beta1)
  # The state's shapes only (nothing initialised or compiled), to restore into.
  shapes = jax.eval_shape(lambda key: create_gan_state(
      generator, discriminator, record["input_shape"], trained.latent_dim, key, g_tx=g_tx, d_tx=d_tx),
      jax.random.key(0, impl=PRNG_IMPL))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
  ckpts = checkpoint.Checkpoints(workdir, best_mode="min")
  try:
    which, restored = "best", ckpts.restore_best(state)
    if restored is None:
      which, restored = "latest", ckpts.restore_latest(state)
  finally:
    ckpts.close()
  state, meta = restored
  return state, record, which, int(meta.get("epoch", 0))


def sample_only(config: GANConfig, log=print) -> str:
  """Writes a grid of samples from --workdir's trained generator; returns its path.

  --label L (conditional runs): `num` images of class L, in
  WORKDIR/samples/labelL_seedS.png. Without --label: in a conditional run
  num // classes images of every class, one row each, the same z down each
  column (classes_seedS.png); in an unconditional one `num` images
  (random_seedS.png).
  """
  validate_config(config)
  record, _, num_classes = read_run(config.workdir)
  names = record.get("class_names") or [str(c) for c in range(num_classes)]
  if config.label is not None and not num_classes:
    raise ConfigError(f"--label needs a conditional run; {config.workdir} holds an unconditional GAN "
                      "(drop --label)")
  if config.label is not None and config.label >= num_classes:
    raise ConfigError(f"--label must be in 0..{num_classes - 1} ({record['dataset']}: "
                      f"{', '.join(names)}), got {config.label}")
  state, record, which, epoch = restore_generator(config.workdir)
  key = jax.random.key(config.seed, impl=PRNG_IMPL)
  nrow, row_labels = math.ceil(math.sqrt(config.num)), None  # a square grid
  if config.label is not None:
    z = jax.random.normal(key, (config.num, state.latent_dim))  # (num, Z)
    labels = jnp.full((config.num,), config.label, jnp.int32)
    name, what = f"label{config.label}", f"{names[config.label]} (label {config.label})"
  elif num_classes:
    nrow = max(1, config.num // num_classes)  # per class: row r is class r, column c one z
    z = jnp.tile(jax.random.normal(key, (nrow, state.latent_dim)), (num_classes, 1))
    labels = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), nrow)
    name, what, row_labels = "classes", "every class", names
  else:
    z, labels = jax.random.normal(key, (config.num, state.latent_dim)), None
    name, what = "random", "random"
  images = np.concatenate([np.asarray(generate(state, z[i:i + 500], None if labels is None
                                               else labels[i:i + 500]))
                           for i in range(0, len(z), 500)])
  side = max(record["input_shape"][:2])
  path = save_image_grid(
      images, os.path.join(config.workdir, "samples", f"{name}_seed{config.seed}.png"), nrow=nrow,
      scale=max(1, -(-84 // side)), row_labels=row_labels,
      title=f"DCGAN on {record['dataset']}, {which} checkpoint (epoch {epoch}): {what}, seed {config.seed}")
  log(path)
  return path
