"""Automatic colorization: grey image -> colour image, by an encoder and the DCGAN decoder.

The pieces, top to bottom:
  ColorizeConfig      every setting of a run; experiments.colorize makes the flags.
  to_grey             ITU-R BT.601 luma, the grey a black-and-white photo holds.
  Colorizer           strided-conv encoder (B, H, W, 1) -> (B, H/8, W/8, C), then
                      `jdl.models.decoder.Decoder` back to (B, H, W, 3) in [-1, 1].
  train_step          one pure MSE update (BatchNorm statistics updated).
  fit                 the task: per-epoch test error against the mean-colour
                      baseline, a PNG of grey / predicted / true rows; the
                      loop is `jdl.engine.run`.

Errors are mean squared errors per pixel and channel on the [0, 1] colour scale.
"""
import dataclasses
import math
import os
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdl import engine, ops, parallel
from jdl.config import option
from jdl.core import PRNG_IMPL, TrainState, apply_if_finite, model_variables
from jdl.data import load_dataset, pipeline
from jdl.errors import ConfigError
from jdl.images import save_image_grid, to_unit_range
from jdl.models.decoder import KERNEL_INIT, Decoder, upsampling_plan
from jdl.summary import summarize

# BT.601 luma weights of R, G, B.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass
class ColorizeConfig:
  """Everything that defines a colorization run."""
  dataset: str = option("shapes", "shapes or shapes_plain (built in, offline), cifar10 or another TFDS RGB image dataset")
  data_dir: Optional[str] = option(None, "where TFDS data is looked for (TFDS default if unset)")
  download: bool = option(True, "allow TFDS to download and prepare a dataset that is not there")
  num_train: int = option(0, "training images: shapes generates this many, TFDS keeps the first N (0: default/all)")
  num_test: int = option(0, "test images, as num_train (0: default/all)")
  width: int = option(64, "encoder channels of the first convolution, doubled twice; decoder base width 2x that")
  learning_rate: float = option(1e-3, "Adam step size")
  batch_size: int = option(64, "images per step")
  epochs: int = option(8, "passes over the training images")
  seed: int = option(0, "seed of initialisation and data order")
  workdir: Optional[str] = option(None, "checkpoints, PNGs, metrics go here; rerunning resumes (default runs/colorize-DATASET-seedS)")
  keep_checkpoints: int = option(2, "latest checkpoints kept for resume")
  nan_policy: str = option("stop", "on a non-finite loss or gradient: stop (naming the step) or skip "
                                   "the step (counted in metrics.jsonl); either way it is not applied")


def validate_config(config: ColorizeConfig) -> None:
  """Raises ConfigError (one line) for a bad value, before anything loads."""
  if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
    raise ConfigError(f"learning_rate must be > 0, got {config.learning_rate}")
  for name in ("width", "batch_size", "keep_checkpoints"):
    if getattr(config, name) < 1:
      raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
  for name in ("epochs", "num_train", "num_test"):
    if getattr(config, name) < 0:
      raise ConfigError(f"{name} must be >= 0, got {getattr(config, name)}")
  if config.nan_policy not in ("stop", "skip"):
    raise ConfigError(f"nan_policy must be stop or skip, got {config.nan_policy!r}")


def to_grey(images) -> jax.Array:
  """Colour images in [-1, 1] (B, H, W, 3) -> their luma (B, H, W, 1), same scale."""
  return images @ jnp.asarray(LUMA)[:, None]  # (B, H, W, 3) @ (3, 1)


class Colorizer(nn.Module):
  """Grey (B, H, W, 1) -> colour (B, H, W, 3), on the [-1, 1] scale.

  Encoder: 3 x [Conv(k4, s2, SAME) -> BatchNorm -> ReLU], widths w, 2w, 4w, so
  (H, W) -> (H/8, W/8); then the DCGAN `Decoder` (Dense -> 3 stride-2 transposed
  convolutions -> tanh) with base width 2w, whose output is added to the grey
  input copied to the three channels.

  Arguments:
    image_shape: (H, W, 3) of the output; H and W multiples of 8 that the
      decoder can reach (32, 64, ...).
    width: w.
    conv, conv_transpose: the (transposed) convolution layers: `nn.Conv`,
      `nn.ConvTranspose` or stand-ins with their fields (`jdl.ops.choices`).
  """
  image_shape: tuple = (32, 32, 3)
  width: int = 64
  conv: Any = nn.Conv
  conv_transpose: Any = nn.ConvTranspose

  @nn.compact
  def __call__(self, grey, *, train: bool = False):
    x = grey
    for i, features in enumerate((self.width, 2 * self.width, 4 * self.width)):
      x = self.conv(features, (4, 4), strides=(2, 2), padding="SAME", use_bias=False,
                    kernel_init=KERNEL_INIT, name=f"conv{i + 1}")(x)  # (B, H/2^(i+1), W/2^(i+1), features)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i + 1}")(x))
    # The decoder predicts the colour's offset from the grey copy: a colour
    # image's luma equals the input, so only the chroma has to be learnt, and
    # the untrained model starts at the grey-copy baseline instead of noise.
    offset = Decoder(tuple(self.image_shape), base_width=2 * self.width,
                     conv_transpose=self.conv_transpose, name="decoder")(x, train=train)
    return jnp.broadcast_to(grey, offset.shape) + offset  # (B, H, W, 3)


def train_step(state: TrainState, colour) -> tuple:
  """One MSE update on colour images in [-1, 1]: (state, loss on the [0, 1] scale, status).

  status: int32, 0 good, 1 non-finite loss, 2 non-finite gradients; a bad step
  is not applied (only the step counter moves), as in jdl.train.train_step.
  """
  grey = to_grey(colour)

  def loss_fn(params):
    predicted, updates = state.apply_fn(model_variables(state, params), grey, train=True,
                                        mutable=["batch_stats"])
    return jnp.mean((predicted - colour) ** 2), updates["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state, status, _ = apply_if_finite(state, grads, loss, batch_stats=batch_stats)
  return state, loss / 4.0, status  # [-1, 1] -> [0, 1] scale: errors halve, squares quarter


@jax.jit
def predict(state: TrainState, colour) -> jax.Array:
  """Colour predicted from the grey of `colour` (B, H, W, 3) in [-1, 1]; eval mode."""
  return state.apply_fn(model_variables(state), to_grey(colour), train=False)


def test_errors(state: TrainState, test_images, mean_colour, batch_size: int = 500) -> Dict[str, float]:
  """MSE on [0, 1] of the model, the mean-colour baseline and the grey copy."""
  sums = np.zeros(3)
  for i in range(0, len(test_images), batch_size):
    colour = to_unit_range(test_images[i:i + batch_size])
    predicted = predict(state, colour)
    grey = jnp.broadcast_to(to_grey(colour), colour.shape)
    for k, guess in enumerate((predicted, jnp.broadcast_to(mean_colour, colour.shape), grey)):
      sums[k] += float(jnp.sum((guess - colour) ** 2)) / 4.0
  count = test_images.size
  return {"test_mse": sums[0] / count, "mean_colour_mse": sums[1] / count,
          "grey_copy_mse": sums[2] / count}


def save_comparison(state: TrainState, images, path: str) -> str:
  """A PNG of three rows: the grey input, the prediction and the true colour."""
  colour = to_unit_range(images)
  grey = jnp.broadcast_to(to_grey(colour), colour.shape)
  return save_image_grid(np.concatenate([grey, predict(state, colour), colour]), path,
                         nrow=len(images), scale=max(1, -(-84 // max(images.shape[1:3]))),
                         row_labels=["grey input", "predicted", "true colour"])


def fit(config: ColorizeConfig, dataset=None, *, devices=None, progress: bool = True,
        log=print) -> dict:
  """Trains the colorizer as `config` says, resuming from its workdir; returns the results.

  With more than one device (`devices`, default all) each step is data
  parallel, as in jdl.train.fit.
  """
  validate_config(config)
  mesh = parallel.data_mesh(devices)
  parallel.check_batch_size(config.batch_size, mesh)
  if dataset is None:
    dataset = load_dataset(config.dataset, data_dir=config.data_dir, num_train=config.num_train or None,
                           num_test=config.num_test or None, seed=config.seed, download=config.download)
  shape = tuple(dataset.input_shape)
  if len(shape) != 3 or shape[-1] != 3:
    raise ConfigError(f"colorization needs RGB images (H, W, 3); {dataset.name} has {shape}")
  upsampling_plan(shape)  # one-line ConfigError for sizes the decoder cannot make
  images = dataset.train[0]
  if config.batch_size > len(images):
    raise ConfigError(f"batch_size {config.batch_size} is larger than the training set ({len(images)} images)")
  workdir = config.workdir or engine.default_workdir("colorize", config.dataset, seed=config.seed)
  record = {"task": "colorize", **dataclasses.asdict(config), "input_shape": list(shape)}
  with engine.workdir(workdir, record) as record:
    model = Colorizer(shape, config.width, **ops.choices(Colorizer))
    log(f"Colorizer on {dataset.name} {shape}\n{summarize(model, shape[:2] + (1,))}")
    init_key, data_key = jax.random.split(jax.random.key(config.seed, impl=PRNG_IMPL))
    variables = jax.jit(model.init)(init_key, jnp.zeros((1, *shape[:2], 1)))
    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              tx=optax.adam(config.learning_rate), batch_stats=variables["batch_stats"])
    state = parallel.replicate(state, mesh)  # before restoring, which keeps these shardings
    parallel.announce(mesh, config.batch_size, log)
    batch_sharding = parallel.shardings(mesh)[1]
    # The baseline: one colour, the training images' mean, for every pixel (B, H, W, 3).
    mean_colour = to_unit_range(images.reshape(-1, 3).mean(0))
    data = parallel.replicate(images, mesh)
    shown = dataset.test[0][:8]
    order_fn = jax.jit(pipeline.epoch_permutation, static_argnums=2)

    def step(state, inputs, index):
      data, order = inputs
      idx = jax.lax.dynamic_slice_in_dim(order, index * config.batch_size, config.batch_size)
      batch = parallel.shard_batch(data[idx], batch_sharding)
      state, loss, status = train_step(state, to_unit_range(batch))
      return state, {"mse": loss, "status": status}

    def evaluate(state, train):
      return {"train_mse": float(train["mse"]), **test_errors(state, dataset.test[0], mean_colour)}

    def describe(epoch, step, row):
      return (f"epoch {epoch}/{config.epochs}  train MSE {row['train_mse']:.4f}  test MSE "
              f"{row['test_mse']:.4f}  (mean colour {row['mean_colour_mse']:.4f}, grey copy "
              f"{row['grey_copy_mse']:.4f})  {row['epoch_time_s']:.0f}s")

    def finish(state, best, info):
      final = test_errors(state, dataset.test[0], mean_colour)
      png = save_comparison(state, shown, os.path.join(workdir, "comparison.png"))
      log(f"test MSE {final['test_mse']:.4f} vs mean colour {final['mean_colour_mse']:.4f} "
          f"({final['test_mse'] / final['mean_colour_mse']:.2f}x) and grey copy "
          f"{final['grey_copy_mse']:.4f}; grey / predicted / true rows in {png}")
      return {"dataset": {"name": dataset.name, "num_train": len(images),
                          "num_test": len(dataset.test[0])},
              **final, "beats_mean_colour": bool(final["test_mse"] < final["mean_colour_mse"]),
              "error_ratio_to_mean_colour": final["test_mse"] / final["mean_colour_mse"],
              "comparison": png}

    task = engine.Task(
        state=state, step=step, inputs=lambda epoch: (data, order_fn(data_key, epoch, len(images))),
        steps_per_epoch=len(images) // config.batch_size, epochs=config.epochs, evaluate=evaluate,
        describe=describe, finish=finish,
        pictures=lambda state, epoch: {"grey_predicted_true": save_comparison(
            state, shown, os.path.join(workdir, "samples", f"epoch_{epoch:03d}.png"))},
        panels={"MSE on [0, 1]": ["train_mse", "test_mse", "mean_colour_mse", "grey_copy_mse"]},
        title=f"colorization on {dataset.name}", examples_per_step=config.batch_size,
        bar_metric=("mse", "mse", 1.0), nan_policy=config.nan_policy,
        keep_checkpoints=config.keep_checkpoints, mesh=mesh)
    _, results = engine.run(task, workdir, record, progress=progress, log=log)
  return results
