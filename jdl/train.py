"""Training and evaluation of classifiers.

The pieces, top to bottom:
  TrainState          params, batch_stats, optimizer state and step: the whole
                      mutable state of a run, a small pytree.
  train_step          one pure update: (state, batch, rng) -> (state, metrics).
  eval_step           per-example-masked metric sums of one batch.
  make_train_fn       the one jitted function the loop calls per step: gathers
                      the batch on the device, normalises, augments, updates.
  evaluate            metrics of a whole split.
  fit                 the loop: input, model and optimizer, resume, epochs with
                      validation, early stopping and checkpoints, final test.
Randomness is explicit: the run's key is split once into init/data/step keys;
step s uses fold_in(step_key, s) and epoch e's order uses fold_in(data_key, e),
so a resumed run replays exactly the batches and dropout masks it would have
seen without the interruption.
"""
import dataclasses
import functools
import math
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from jdl import checkpoint, losses, metrics as metrics_lib, optim, parallel, xla
from jdl.config import TrainConfig, default_workdir, make_writable_dir, validate
from jdl.data import Dataset, load_dataset, pipeline, split_validation
from jdl.errors import ConfigError
from jdl.logs import MetricWriter, write_json
from jdl.models import build_model
from jdl.plots import plot_learning_curves
from jdl.reliability import StepChecker, StopSignals, keep_if, save_mid_epoch
from jdl.summary import summarize


# The run's PRNG: XLA's RngBitGenerator for random bits. Deterministic for a
# given backend like threefry, but its programs compile ~8x faster on XLA:CPU
# (0.37 s vs 2.9 s for one normal draw of (128, 32, 32, 16); BUILD_NOTES.md),
# which is most of the time to first step of a small model.
PRNG_IMPL = "rbg"



class TrainState(train_state.TrainState):
  """Flax's TrainState plus BatchNorm statistics (None for models without)."""
  batch_stats: Any = None


# ----------------------------------------------------------------------------
# Model, optimizer and state.
# ----------------------------------------------------------------------------

def build_classifier(config: TrainConfig, num_classes: int):
  """The model `config` names, with its flag overrides and compute dtype."""
  overrides = {"num_classes": num_classes,
               "dtype": jnp.bfloat16 if config.precision == "bfloat16" else jnp.float32}
  if config.activation is not None:
    overrides["activation"] = config.activation
  for name in ("dropout", "hidden_size", "num_layers", "bidirectional"):
    if getattr(config, name) is not None:
      overrides[name] = getattr(config, name)
  if config.rnn_implementation is not None:
    overrides["implementation"] = config.rnn_implementation
  return build_model(config.model, **overrides)


def build_optimizer(config: TrainConfig, total_steps: int, steps_per_epoch: int):
  """The Optax optimizer and learning-rate schedule `config` names."""
  schedule = optim.make_schedule(
      config.schedule, config.learning_rate, max(total_steps, 1),
      decay_rate=config.decay_rate,
      decay_steps=config.decay_steps or steps_per_epoch,
      warmup_steps=config.warmup_steps or None,
      boundaries=tuple(config.boundaries), scale=config.boundary_scale)
  tx = optim.make_optimizer(config.optimizer, schedule, momentum=config.momentum,
                            weight_decay=config.weight_decay,
                            clip_norm=config.clip_norm or None)
  return tx, schedule


def init_variables(model, input_shape, rng) -> dict:
  """Fresh {'params', 'batch_stats'?} of `model` for (1, *input_shape) inputs."""
  init = jax.jit(functools.partial(model.init, train=False))
  return init({"params": rng}, jnp.zeros((1, *input_shape), jnp.float32))


def create_train_state(model, input_shape, tx, rng, *, variables=None,
                       frozen: Sequence[str] = ()) -> TrainState:
  """Initialises parameters (and BatchNorm statistics) for (1, *input_shape) inputs.

  Arguments:
    model, input_shape, tx, rng: the module, one example's shape, the optimizer
      and the init key.
    variables: optional {'params', 'batch_stats'} to start from instead (e.g.
      pretrained weights put in place by `jdl.transfer.restore_matching`).
    frozen: regexes on parameter paths that get no update (`optim.freeze`).
  """
  if variables is None:
    variables = init_variables(model, input_shape, rng)
  if frozen:
    tx = optim.freeze(tx, variables["params"], frozen)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables.get("batch_stats"))


# ----------------------------------------------------------------------------
# The update step and evaluation.
# ----------------------------------------------------------------------------

def _variables(state: TrainState, params) -> dict:
  variables = {"params": params}
  if state.batch_stats is not None:
    variables["batch_stats"] = state.batch_stats
  return variables


def train_step(state: TrainState, batch, rng, *, label_smoothing: float = 0.0,
               l1: float = 0.0, l2: float = 0.0, top_k: int = 5, frozen_stats=None):
  """One gradient step on a batch. Pure: jit it, vmap it, scan it.

  A step whose loss or gradients are not finite changes nothing but the step
  counter: parameters, BatchNorm statistics and optimizer state stay as they
  were, and `metrics['skipped']` is 1. (The loop then stops or counts, as
  --nan_policy says.) The check is two `isfinite` reductions and a select per
  leaf, cheap next to the step.

  Arguments:
    state: the TrainState.
    batch: (images (B, H, W, C) float, labels (B,) int32).
    rng: key for dropout.
    label_smoothing, l1, l2: loss terms (see jdl.losses); static.
    top_k: also report top-k accuracy when there are more than k classes.
    frozen_stats: optional tree of Python bools like state.batch_stats; True
      leaves (BatchNorm statistics of frozen layers) keep their old values.
  Returns:
    (new state, metrics dict of scalars: loss, accuracy, [top5,] grad_norm,
    loss_finite, skipped). Metrics of a skipped step are those of the failed
    attempt (so they show what went wrong).
  """
  images, labels = batch

  def loss_fn(params):
    (logits, _), updates = state.apply_fn(
        _variables(state, params), images, train=True, rngs={"dropout": rng},
        mutable=["batch_stats"])
    data_loss = losses.softmax_cross_entropy(logits, labels, label_smoothing).mean()
    loss = data_loss
    if l1:
      loss = loss + l1 * losses.l1_penalty(params)
    if l2:
      loss = loss + l2 * losses.l2_penalty(params)
    return loss, (logits, updates, data_loss)

  (loss, (logits, updates, data_loss)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  batch_stats = updates.get("batch_stats", state.batch_stats)
  if frozen_stats is not None:
    batch_stats = jax.tree.map(lambda keep, old, new: old if keep else new,
                               frozen_stats, state.batch_stats, batch_stats)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  grad_norm = optax.global_norm(grads)
  loss_finite = jnp.isfinite(loss)
  ok = loss_finite & jnp.isfinite(grad_norm)
  state = keep_if(ok, new_state, state).replace(step=new_state.step)  # Counts batches seen, skipped or not.
  metrics = {"loss": data_loss,
             "accuracy": metrics_lib.accuracy(logits, labels).mean(),
             "grad_norm": grad_norm,
             "loss_finite": loss_finite.astype(jnp.float32),
             "skipped": 1.0 - ok.astype(jnp.float32)}
  if logits.shape[-1] > top_k:
    metrics[f"top{top_k}"] = metrics_lib.top_k_accuracy(logits, labels, top_k).mean()
  return state, metrics


def eval_step(state: TrainState, batch, mask, *, top_k: int = 5) -> Dict[str, jax.Array]:
  """Metric SUMS over the real (mask == 1) examples of a padded batch.

  Arguments:
    state: the TrainState (BatchNorm uses its running statistics).
    batch: (images (B, H, W, C) float, labels (B,) int32).
    mask: (B,) float, 0 for padding.
  """
  images, labels = batch
  logits, _ = state.apply_fn(_variables(state, state.params), images, train=False)
  sums = {"loss": (losses.softmax_cross_entropy(logits, labels) * mask).sum(),
          "accuracy": (metrics_lib.accuracy(logits, labels) * mask).sum(),
          "count": mask.sum()}
  if logits.shape[-1] > top_k:
    sums[f"top{top_k}"] = (metrics_lib.top_k_accuracy(logits, labels, top_k) * mask).sum()
  return sums


def make_train_fn(config: TrainConfig, top_k: int = 5, frozen_stats=None, batch_sharding=None,
                  jit: bool = True):
  """The loop's one jitted function: batch gather + preprocessing + train_step.

  Signature of the result: (state, sums, data, order, index, step_key) ->
  (state, sums, status), where `data` = {'images': uint8 (N,H,W,C), 'labels':
  (N,), 'mean', 'std': (C,) input normalisation} on the device, `order` the
  epoch's permutation, `index` the step within the epoch and `sums` running
  sums of the step metrics over the steps that were not skipped, plus the
  count of skipped ones (fetched only at log points).
  `status` is an int32 scalar, 0 for a good step, 1 for a non-finite loss and
  2 for finite loss but non-finite gradients. It is not donated onwards: the
  loop waits on it a couple of steps behind, so the progress bar counts
  finished steps and a bad step is noticed without a sync per step.
  With `batch_sharding` (data parallel, see jdl.parallel) the gathered batch
  is split over the devices along its first axis. `jit=False`: the function
  unjitted, for a caller that jits it inside its own program (`jdl.seeds`
  vmaps it; compile options go on the outermost jit only).
  """
  dtype = jnp.bfloat16 if config.precision == "bfloat16" else jnp.float32
  step_fn = functools.partial(train_step, label_smoothing=config.label_smoothing,
                              l1=config.l1, l2=config.l2, top_k=top_k, frozen_stats=frozen_stats)

  def train_fn(state, sums, data, order, index, step_key):
    images, labels = pipeline.take_batch(data["images"], data["labels"], order, index,
                                         config.batch_size)
    images, labels = parallel.shard_batch((images, labels), batch_sharding)
    aug_key, dropout_key = jax.random.split(jax.random.fold_in(step_key, state.step))
    images = pipeline.normalize(images, data["mean"], data["std"], dtype)
    if config.augment:
      images = pipeline.augment(aug_key, images)
    state, step_metrics = step_fn(state, (images, labels), dropout_key)
    skipped = step_metrics.pop("skipped")
    loss_finite = step_metrics.pop("loss_finite")
    status = jnp.where(skipped > 0, jnp.where(loss_finite > 0, 2, 1), 0).astype(jnp.int32)
    sums = {name: sums[name] + (skipped if name == "skipped" else
                                jnp.where(skipped > 0, 0.0, step_metrics[name]))
            for name in sums}
    return state, sums, status

  return xla.jit(train_fn, donate_argnums=(0, 1)) if jit else train_fn


def make_eval_fn(config: TrainConfig, top_k: int = 5, batch_sharding=None, jit: bool = True):
  """The jitted evaluation step: (state, sums, images, labels, mask, stats) ->
  sums plus this batch's metric sums; `jit=False`: the function unjitted,
  for a caller that jits it inside its own program (`jdl.seeds` vmaps it)."""
  dtype = jnp.bfloat16 if config.precision == "bfloat16" else jnp.float32

  def eval_fn(state, sums, images, labels, mask, stats):
    images, labels, mask = parallel.shard_batch((images, labels, mask), batch_sharding)
    images = pipeline.normalize(images, *stats, dtype)
    batch_sums = eval_step(state, (images, labels), mask, top_k=top_k)
    return jax.tree.map(jnp.add, sums, batch_sums)

  return xla.jit(eval_fn) if jit else eval_fn


def batch_for_eval(split, batch_size: int, sharding=None):
  """Pads a split to whole batches and puts it on the device, batch-major.

  Returns (images (K, B, H, W, C), labels (K, B), mask (K, B)); one compiled
  eval function then serves every split whatever its size.
  """
  images, labels = split
  num_batches = max(1, math.ceil(len(labels) / batch_size))
  pad = num_batches * batch_size - len(labels)
  mask = np.concatenate([np.ones(len(labels), np.float32), np.zeros(pad, np.float32)])
  images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
  labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
  shape = lambda a: a.reshape(num_batches, batch_size, *a.shape[1:])
  return jax.device_put((shape(images), shape(labels), shape(mask)), sharding)


def metric_names(num_classes: int, train: bool, top_k: int = 5):
  """The keys of train_step's metrics (train) or eval_step's sums (not train)."""
  names = ["loss", "accuracy"] + ([f"top{top_k}"] if num_classes > top_k else [])
  return names + (["grad_norm", "skipped"] if train else ["count"])


def zero_sums(names):
  return {name: jnp.zeros((), jnp.float32) for name in names}


def evaluate(eval_fn, state: TrainState, batched, num_classes: int) -> Dict[str, float]:
  """Mean metrics of a split prepared by `batch_for_eval` (one host sync)."""
  images, labels, mask = batched
  sums = zero_sums(metric_names(num_classes, train=False))
  for i in range(images.shape[0]):
    sums = eval_fn(state, sums, images[i], labels[i], mask[i])
  sums = jax.device_get(sums)
  count = max(float(sums.pop("count")), 1.0)
  return {k: float(v) / count for k, v in sums.items()}


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------

def prepare_workdir(config: TrainConfig) -> Tuple[str, bool]:
  """Creates the workdir, refusing one that is unwritable or holds another run.

  Returns (workdir, created): `created` is True when the directory did not
  exist, so that a run failing before it writes anything can remove it again.
  The config is written later, by `fit`, once the data has loaded.
  """
  import json
  workdir = config.workdir or default_workdir(config)
  created = not os.path.exists(workdir)
  make_writable_dir(workdir)
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    try:
      with open(path) as f:
        previous = json.load(f)
    except (OSError, ValueError) as e:
      raise ConfigError(f"workdir {workdir} has an unreadable config.json ({e}); "
                        "use another --workdir") from None
    for key in ("model", "dataset"):
      if previous.get(key) != getattr(config, key):
        raise ConfigError(
            f"workdir {workdir} holds a run of model {previous.get('model')!r} on "
            f"{previous.get('dataset')!r}, not {config.model!r} on {config.dataset!r}; "
            "use another --workdir")
  return workdir, created


def start_run(config: TrainConfig, dataset: Optional[Dataset], workdir: str, created: bool,
              mesh=None, input_stats=None) -> Tuple[Dataset, Any, Any, Tuple[Any, Any]]:
  """Loads the data, holds out validation, checks sizes, writes config.json.

  Returns (dataset, train split, validation split, (mean, std)): the per-channel
  input statistics the run normalises with, `input_stats` or else the training
  split's. On any failure a workdir this run created is removed again if still
  empty.
  """
  try:
    if dataset is None:
      dataset = load_dataset(config.dataset, data_dir=config.data_dir,
                             num_train=config.num_train or None, num_test=config.num_test or None,
                             seed=config.seed, download=config.download)
    train, val = split_validation(dataset.train, config.validation_fraction, config.seed)
    if config.augment and len(dataset.input_shape) != 3:
      raise ConfigError(f"--augment needs images (H, W, C); {dataset.name} has inputs of shape "
                        f"{dataset.input_shape}")
    parallel.check_batch_size(config.batch_size, mesh)
    if config.batch_size > len(train[1]):
      raise ConfigError(f"batch_size {config.batch_size} is larger than the training split "
                        f"({len(train[1])} examples after holding out validation)")
  except BaseException:
    if created and not os.listdir(workdir):
      os.rmdir(workdir)  # Leave no empty run directory behind a failed start.
    raise
  mean, std = input_stats if input_stats is not None else pipeline.channel_stats(train[0])
  # The config, plus what rebuilding the model and feeding it needs (transfer
  # learning reads it: a frozen backbone wants inputs normalised as it saw them).
  write_json(os.path.join(workdir, "config.json"),
             {**dataclasses.asdict(config), "num_classes": dataset.num_classes,
              "input_shape": list(dataset.input_shape),
              "input_mean": np.asarray(mean, np.float64).tolist(),
              "input_std": np.asarray(std, np.float64).tolist()})
  return dataset, train, val, (mean, std)


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def _format_row(row: Dict[str, float]) -> str:
  parts = [f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.2%}"]
  if "val_loss" in row:
    parts.append(f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.2%}")
  parts.append(f"{row['epoch_time_s']:.1f}s ({row['examples_per_s']:,.0f} ex/s)")
  return "  ".join(parts)


def fit(config: TrainConfig, dataset: Optional[Dataset] = None, *,
        model=None, variables=None, frozen: Sequence[str] = (), input_stats=None,
        devices=None, progress: bool = True, log=print):
  """Trains a classifier as `config` says, resuming from its workdir if possible.

  Arguments:
    config: the run's TrainConfig (validated here).
    dataset: data already in memory; loaded by name from `config` when None.
    model: a Flax module to train instead of `config.model` (transfer learning);
      it must return (logits, features) like every jdl model.
    variables: {'params', 'batch_stats'} to start from instead of a fresh init
      (a resumed run restores its checkpoint over them).
    frozen: regexes on parameter paths ('backbone/conv1/kernel') that are not
      trained: no optimizer update, and their BatchNorm statistics kept.
    input_stats: (mean, std) per channel to normalise inputs with, instead of
      the training split's (e.g. (0, 1) for precomputed features).
    devices: devices to train on, data parallel when more than one (default:
      all of them; see jdl.parallel).
    progress: show progress bars.
    log: where status lines go (print by default).
  Returns:
    (state, results): the TrainState evaluated on test (the best by validation
    accuracy when there is a validation split) and the dict also written to
    WORKDIR/results.json. With config.num_seeds > 1, `jdl.seeds.fit_seeds`'s
    stacked states and mean ± std results instead.
  """
  from tqdm import tqdm
  start_time = time.time()
  validate(config)
  if config.num_seeds > 1:
    if any(x is not None for x in (model, variables, input_stats)) or frozen:
      raise ConfigError("--num_seeds > 1 trains config.model from scratch; it takes no model, "
                        "variables, frozen or input_stats")
    from jdl import seeds  # It builds on this module.
    return seeds.fit_seeds(config, dataset, devices=devices, progress=progress, log=log)
  workdir, created = prepare_workdir(config)

  # --- Input: the whole dataset on the device. ---
  mesh = parallel.data_mesh(devices)
  dataset, train, val, (mean, std) = start_run(config, dataset, workdir, created, mesh, input_stats)
  num_train, num_classes = len(train[1]), dataset.num_classes
  steps_per_epoch = num_train // config.batch_size  # The remainder is dropped; order changes every epoch.
  # mean/std travel as arguments, not constants baked into the programs, so runs
  # on other data of the same shapes reuse compiled programs from the cache.
  replicated, batch_sharding = parallel.shardings(mesh)
  data = jax.device_put({"images": train[0], "labels": train[1], "mean": mean, "std": std},
                        replicated)
  eval_batch_size = parallel.round_up(min(1000, max(len(dataset.test[1]), 1)), mesh)
  val_batched = batch_for_eval(val, eval_batch_size, replicated) if len(val[1]) else None
  test_batched = batch_for_eval(dataset.test, eval_batch_size, replicated)

  # --- Model, optimizer and state. ---
  model = model or build_classifier(config, num_classes)
  summary = summarize(model, dataset.input_shape,
                      frozen=optim.path_matcher(frozen) if frozen else None)
  log(f"Model {config.model} on {dataset.name} {dataset.input_shape}, {num_classes} classes\n{summary}")
  tx, schedule = build_optimizer(config, steps_per_epoch * config.epochs, steps_per_epoch)
  init_key, data_key, step_key = jax.random.split(jax.random.key(config.seed, impl=PRNG_IMPL), 3)
  state = create_train_state(model, dataset.input_shape, tx, init_key, variables=variables,
                             frozen=frozen)
  frozen_stats = (optim.frozen_mask(state.batch_stats, frozen)
                  if frozen and state.batch_stats is not None else None)
  state = parallel.replicate(state, mesh)
  parallel.announce(mesh, config.batch_size, log)

  # --- Checkpoints: resume if the workdir has one. ---
  ckpts = checkpoint.Checkpoints(workdir, config.keep_checkpoints)
  # Loop bookkeeping saved with every checkpoint. `epoch` counts completed
  # epochs; a checkpoint taken inside an epoch (on SIGTERM/SIGINT) also holds
  # how many steps of the next epoch are done and their metric sums.
  meta = {"epoch": 0, "step_in_epoch": 0, "partial_sums": None, "best_val_accuracy": None,
          "best_epoch": 0, "epochs_since_best": 0, "stopped_early": False, "train_time_s": 0.0}
  restored = ckpts.restore_latest(state)
  if restored is not None:
    state, saved = restored
    meta.update(saved)
    where = f"epoch {meta['epoch']} done" + (
        f" and {meta['step_in_epoch']} steps of epoch {meta['epoch'] + 1}" if meta["step_in_epoch"] else "")
    log(f"Resuming from {workdir}: {where}, step {int(state.step)}")
  writer = MetricWriter(workdir, meta["epoch"])

  # --- Training loop: one jitted step per batch, metrics fetched at log points. ---
  # Under the mesh, recurrent layers split their loops over the devices themselves.
  train_fn = parallel.within(mesh, make_train_fn(config, frozen_stats=frozen_stats,
                                                 batch_sharding=batch_sharding))
  eval_fn = functools.partial(parallel.within(mesh, make_eval_fn(config, batch_sharding=batch_sharding)),
                              stats=(data["mean"], data["std"]))
  order_fn = jax.jit(pipeline.epoch_permutation, static_argnums=2)
  compile_s = None
  with StopSignals() as stop:
    for epoch in range(meta["epoch"] + 1, config.epochs + 1):
      if meta["stopped_early"]:
        break
      epoch_start = time.time()
      first_index = meta["step_in_epoch"]  # > 0 only when resuming inside this epoch
      order = order_fn(data_key, epoch, num_train)
      sums = zero_sums(metric_names(num_classes, train=True))
      if meta["partial_sums"]:
        sums = {k: jnp.asarray(meta["partial_sums"][k], jnp.float32) for k in sums}
      with tqdm(total=steps_per_epoch * config.batch_size, initial=first_index * config.batch_size,
                unit="ex", unit_scale=True, desc=f"epoch {epoch}/{config.epochs}",
                disable=not progress, leave=False, file=sys.stderr, mininterval=0.5) as bar:
        checker = StepChecker(config.nan_policy, epoch, workdir,
                              on_done=lambda: bar.update(config.batch_size))
        for index in range(first_index, steps_per_epoch):
          state, sums, status = train_fn(state, sums, data, order, index, step_key)
          if compile_s is None:
            jax.block_until_ready(sums)  # Once: separates compile time from step time.
            compile_s = time.time() - epoch_start
          checker.push(int(state.step), status)
          if stop.signum or index + 1 == steps_per_epoch:
            checker.flush()
          if (index + 1) % config.log_every == 0:
            bar.set_postfix(loss=f"{float(sums['loss']) / max(index + 1 - float(sums['skipped']), 1):.4f}")
          if stop.signum and index + 1 < steps_per_epoch:
            save_mid_epoch(ckpts, state, meta, index + 1, sums, time.time() - epoch_start)
            raise stop.interrupted(f"at step {int(state.step)} (epoch {epoch}, step {index + 1} of "
                                   f"{steps_per_epoch})", workdir)
      sums = jax.device_get(sums)
      epoch_time = time.time() - epoch_start
      step = int(state.step)
      skipped = float(sums.pop("skipped"))
      good_steps = max(steps_per_epoch - skipped, 1)
      row = {f"train_{k}": float(v) / good_steps for k, v in sums.items()}
      row.update(learning_rate=float(schedule(step)), epoch_time_s=epoch_time,
                 examples_per_s=(steps_per_epoch - first_index) * config.batch_size / epoch_time)
      if config.nan_policy == "skip":
        row["train_skipped_steps"] = skipped
      finite = _all_finite(state.params)
      if val_batched is not None:
        row.update({f"val_{k}": v for k, v in evaluate(eval_fn, state, val_batched, num_classes).items()})
        # A model with non-finite parameters or validation loss is never the best.
        improved = finite and math.isfinite(row["val_loss"]) and (
            meta["best_val_accuracy"] is None or row["val_accuracy"] > meta["best_val_accuracy"])
        if improved:
          meta.update(best_val_accuracy=row["val_accuracy"], best_epoch=epoch, epochs_since_best=0)
        else:
          meta["epochs_since_best"] += 1
      meta.update(epoch=epoch, step_in_epoch=0, partial_sums=None)
      meta["train_time_s"] += time.time() - epoch_start
      patience = config.early_stopping_patience
      meta["stopped_early"] = bool(patience and meta["epochs_since_best"] >= patience)
      writer.write(step, epoch, row)
      # Best before latest: a run killed between the two redoes this epoch on
      # resume (the latest still points before it) and saves both again, so the
      # latest checkpoint never claims a best that is not on disk.
      if val_batched is not None and meta["best_epoch"] == epoch:
        ckpts.save_best(step, state, meta)
      ckpts.save_latest(step, state, meta)
      log(f"epoch {epoch}/{config.epochs}  {_format_row(row)}")
      if meta["stopped_early"]:
        log(f"Early stopping: no better validation accuracy for {patience} epochs "
            f"(best {meta['best_val_accuracy']:.2%} at epoch {meta['best_epoch']})")
      if stop.signum and epoch < config.epochs:
        raise stop.interrupted(f"after epoch {epoch} (step {step})", workdir)

  # --- Final evaluation of the best parameters on the test split. ---
  best = ckpts.restore_best(state) if val_batched is not None else None
  final_state = best[0] if best is not None else state
  test = evaluate(eval_fn, final_state, test_batched, num_classes)
  writer.close()
  ckpts.close()
  curves = None
  if writer.history:
    curves = plot_learning_curves(writer.history, os.path.join(workdir, "learning_curves.png"),
                                  title=f"{config.model} on {dataset.name}")
  results = {
      "config": dataclasses.asdict(config),
      "dataset": {"name": dataset.name, "num_train": num_train, "num_val": len(val[1]),
                  "num_test": len(dataset.test[1]), "num_classes": num_classes},
      "params_count": summary.total_params,
      "trainable_params": summary.trainable_params,
      "test_accuracy": test["accuracy"],
      "test_loss": test["loss"],
      **({"test_top5": test["top5"]} if "top5" in test else {}),
      "best_val_accuracy": meta["best_val_accuracy"],
      "best_epoch": meta["best_epoch"],
      "epochs_run": meta["epoch"],
      "stopped_early": meta["stopped_early"],
      "train_time_s": meta["train_time_s"],
      "compile_s": compile_s,
      "wall_time_s": time.time() - start_time,
      "devices": [d.device_kind for d in jax.devices()],
      "learning_curves": curves,
  }
  write_json(os.path.join(workdir, "results.json"), results)
  log(f"test accuracy {test['accuracy']:.2%}  test loss {test['loss']:.4f}  "
      f"(best epoch {meta['best_epoch']}); results in {workdir}/results.json")
  return final_state, results
