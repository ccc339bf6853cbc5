"""The classification task: cifar, sequence and transfer runs, through `jdl.engine`.

The pieces, top to bottom:
  build_classifier, build_optimizer, create_train_state
                      the model, optimizer and state a config names.
  train_step          one pure update: (state, batch, rng) -> (state, metrics).
  eval_step           per-example-masked metric sums of one batch.
  make_step           the task's step for the loop: gathers the batch on the
                      device, normalises, augments, updates.
  evaluate            metrics of a whole split.
  load_splits         the data, the validation split and the input statistics.
  fit                 the task: data, model, optimizer, state, then `engine.run`
                      (epochs with validation, best checkpoint by validation
                      accuracy, early stopping), then the test figures.
Randomness is explicit: the run's key is split once into init/data/step keys;
step s uses fold_in(step_key, s) and epoch e's order uses fold_in(data_key, e),
so a resumed run replays exactly the batches and dropout masks it would have
seen without the interruption. `jdl.seeds` trains N of these at once.
"""
import dataclasses
import functools
import math
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdl import engine, losses, metrics as metrics_lib, optim, parallel, xla
from jdl.config import TrainConfig, validate
from jdl.core import PRNG_IMPL, TrainState, apply_if_finite, init_variables, model_variables
from jdl.data import Dataset, load_dataset, pipeline, split_validation
from jdl.errors import ConfigError
from jdl.models import build_model
from jdl.summary import summarize


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

def train_step(state: TrainState, batch, rng, *, label_smoothing: float = 0.0,
               l1: float = 0.0, l2: float = 0.0, top_k: int = 5, frozen_stats=None):
  """One gradient step on a batch. Pure: jit it, vmap it, scan it.

  A step whose loss or gradients are not finite changes nothing but the step
  counter: parameters, BatchNorm statistics and optimizer state stay as they
  were (`core.apply_if_finite`), and `metrics['status']` says why (the loop
  then stops or counts, as --nan_policy says).

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
    status: int32, 0 good, 1 non-finite loss, 2 non-finite gradients).
    Metrics of a skipped step are those of the failed attempt (so they show
    what went wrong).
  """
  images, labels = batch

  def loss_fn(params):
    (logits, _), updates = state.apply_fn(
        model_variables(state, params), images, train=True, rngs={"dropout": rng},
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
  state, status, grad_norm = apply_if_finite(state, grads, loss, batch_stats=batch_stats)
  metrics = {"loss": data_loss,
             "accuracy": metrics_lib.accuracy(logits, labels).mean(),
             "grad_norm": grad_norm,
             "status": status}
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
  logits, _ = state.apply_fn(model_variables(state), images, train=False)
  sums = {"loss": (losses.softmax_cross_entropy(logits, labels) * mask).sum(),
          "accuracy": (metrics_lib.accuracy(logits, labels) * mask).sum(),
          "count": mask.sum()}
  if logits.shape[-1] > top_k:
    sums[f"top{top_k}"] = (metrics_lib.top_k_accuracy(logits, labels, top_k) * mask).sum()
  return sums


def make_step(config: TrainConfig, top_k: int = 5, frozen_stats=None, batch_sharding=None):
  """The task's step for `jdl.engine`: (state, inputs, index) -> (state, metrics).

  `inputs` = (data, order, step_key): data = {'images': uint8 (N, H, W, C) or
  float sequences, 'labels': (N,), 'mean', 'std': (C,) input normalisation} on
  the device, `order` the epoch's permutation (N,), and the run's step key;
  `index` is the step within the epoch. The batch is gathered, normalised and
  augmented on the device, then `train_step` updates. With `batch_sharding`
  (data parallel, see jdl.parallel) the gathered batch is split over the
  devices along its first axis. Unjitted: the engine jits it (and `jdl.seeds`
  vmaps it first).
  """
  dtype = jnp.bfloat16 if config.precision == "bfloat16" else jnp.float32
  step_fn = functools.partial(train_step, label_smoothing=config.label_smoothing,
                              l1=config.l1, l2=config.l2, top_k=top_k, frozen_stats=frozen_stats)

  def step(state, inputs, index):
    data, order, step_key = inputs
    images, labels = pipeline.take_batch(data["images"], data["labels"], order, index,
                                         config.batch_size)
    images, labels = parallel.shard_batch((images, labels), batch_sharding)
    aug_key, dropout_key = jax.random.split(jax.random.fold_in(step_key, state.step))
    images = pipeline.normalize(images, data["mean"], data["std"], dtype)
    if config.augment:
      images = pipeline.augment(aug_key, images)
    return step_fn(state, (images, labels), dropout_key)

  return step


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


def eval_names(num_classes: int, top_k: int = 5):
  """The keys of eval_step's sums."""
  return ["loss", "accuracy"] + ([f"top{top_k}"] if num_classes > top_k else []) + ["count"]


def evaluate(eval_fn, state: TrainState, batched, num_classes: int, replicas: int = 0):
  """Mean metrics of a split prepared by `batch_for_eval` (one host sync).

  `replicas`: N stacked states (`jdl.seeds`): each metric is then an (N,) array.
  """
  images, labels, mask = batched
  shape = (replicas,) if replicas else ()
  sums = {name: jnp.zeros(shape, jnp.float32) for name in eval_names(num_classes)}
  for i in range(images.shape[0]):
    sums = eval_fn(state, sums, images[i], labels[i], mask[i])
  sums = jax.device_get(sums)
  count = np.maximum(sums.pop("count"), 1.0)
  return {k: (v / count if replicas else float(v) / float(count)) for k, v in sums.items()}


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------

# The classification task.
# ----------------------------------------------------------------------------

def load_splits(config: TrainConfig, dataset: Optional[Dataset] = None, mesh=None, input_stats=None):
  """The data of a run: (dataset, train split, validation split, (mean, std)).

  Loads `config.dataset` unless `dataset` is given, holds out the validation
  split (seeded), checks the batch size against it and the device count, and
  gives the per-channel input statistics the run normalises with
  (`input_stats`, else the training split's).
  """
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
  mean, std = input_stats if input_stats is not None else pipeline.channel_stats(train[0])
  return dataset, train, val, (mean, std)


def run_record(config: TrainConfig, dataset: Dataset, mean, std, task: str = "classifier") -> dict:
  """config.json of a classifier run: the config, plus what rebuilding the model
  and feeding it needs (transfer learning reads it: a frozen backbone wants
  inputs normalised as it saw them)."""
  return {"task": task, **dataclasses.asdict(config), "num_classes": dataset.num_classes,
          "input_shape": list(dataset.input_shape),
          "input_mean": np.asarray(mean, np.float64).tolist(),
          "input_std": np.asarray(std, np.float64).tolist()}


def _format_row(row: Dict[str, float]) -> str:
  parts = [f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.2%}"]
  if "val_loss" in row:
    parts.append(f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.2%}")
  parts.append(f"{row['epoch_time_s']:.1f}s ({row['examples_per_s']:,.0f} ex/s)")
  return "  ".join(parts)


def fit(config: TrainConfig, dataset: Optional[Dataset] = None, *, model=None, tx=None,
        variables=None, frozen: Sequence[str] = (), input_stats=None, extra_record: Optional[dict] = None,
        devices=None, progress: bool = True, log=print):
  """Trains a classifier as `config` says, resuming from its workdir if possible.

  Arguments:
    config: the run's TrainConfig (validated here); one seed (`jdl.seeds.fit`
      trains several).
    dataset: data already in memory; loaded by name from `config` when None.
    model: a Flax module to train instead of `config.model` (it must return
      (logits, features) like every jdl model).
    tx: an optax optimizer to train with instead of `config.optimizer` and its
      schedule.
    variables: {'params', 'batch_stats'} to start from instead of a fresh init
      (a resumed run restores its checkpoint over them).
    frozen: regexes on parameter paths ('backbone/conv1/kernel') that are not
      trained: no optimizer update, and their BatchNorm statistics kept.
    input_stats: (mean, std) per channel to normalise inputs with, instead of
      the training split's (e.g. (0, 1) for precomputed features).
    extra_record: more config.json fields that say what this run is (a transfer
      scenario's set-up); a rerun must match them to resume.
    devices: devices to train on, data parallel when more than one (default:
      all of them; see jdl.parallel).
    progress: show progress bars (on a terminal).
    log: where status lines go (print by default).
  Returns:
    (state, results): the TrainState evaluated on test (the best by validation
    accuracy when there is a validation split) and the dict also written to
    WORKDIR/results.json.
  """
  validate(config)
  if config.num_seeds > 1:
    raise ConfigError("num_seeds > 1 trains several replicas: use jdl.seeds.fit "
                      "(experiments.cifar and sequence choose it by --num_seeds)")
  mesh = parallel.data_mesh(devices)
  dataset, train, val, (mean, std) = load_splits(config, dataset, mesh, input_stats)
  num_train, num_classes = len(train[1]), dataset.num_classes
  steps_per_epoch = num_train // config.batch_size  # The remainder is dropped; order changes every epoch.
  record = {**run_record(config, dataset, mean, std),
            **({"model_class": type(model).__name__} if model is not None else {}),
            **({"optimizer": "given to fit"} if tx is not None else {}), **(extra_record or {})}
  workdir = config.workdir or engine.default_workdir(config.dataset, config.model, seed=config.seed)
  with engine.workdir(workdir, record) as record:
    # --- Input: the whole dataset on the device. ---
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
    schedule = None
    if tx is None:
      tx, schedule = build_optimizer(config, steps_per_epoch * config.epochs, steps_per_epoch)
    init_key, data_key, step_key = jax.random.split(jax.random.key(config.seed, impl=PRNG_IMPL), 3)
    state = create_train_state(model, dataset.input_shape, tx, init_key, variables=variables,
                               frozen=frozen)
    frozen_stats = (optim.frozen_mask(state.batch_stats, frozen)
                    if frozen and state.batch_stats is not None else None)
    state = parallel.replicate(state, mesh)
    parallel.announce(mesh, config.batch_size, log)

    # --- What the loop calls. ---
    eval_fn = functools.partial(parallel.within(mesh, make_eval_fn(config, batch_sharding=batch_sharding)),
                                stats=(data["mean"], data["std"]))
    order_fn = jax.jit(pipeline.epoch_permutation, static_argnums=2)

    def evaluate_epoch(state, train_means):
      row = {f"train_{k}": float(v) for k, v in train_means.items()}
      if schedule is not None:
        row["learning_rate"] = float(schedule(int(state.step)))
      if val_batched is not None:
        row.update({f"val_{k}": v for k, v in evaluate(eval_fn, state, val_batched, num_classes).items()})
      if config.test_every_epoch:
        row.update({f"test_{k}": v for k, v in evaluate(eval_fn, state, test_batched, num_classes).items()})
      return row

    def finish(state, best, info):
      test = evaluate(eval_fn, best, test_batched, num_classes)
      log(f"test accuracy {test['accuracy']:.2%}  test loss {test['loss']:.4f}  "
          f"(best epoch {info['best_epoch']}); results in {workdir}/results.json")
      return {"dataset": {"name": dataset.name, "num_train": num_train, "num_val": len(val[1]),
                          "num_test": len(dataset.test[1]), "num_classes": num_classes},
              "params_count": summary.total_params, "trainable_params": summary.trainable_params,
              "test_accuracy": test["accuracy"], "test_loss": test["loss"],
              **({"test_top5": test["top5"]} if "top5" in test else {}),
              "best_val_accuracy": info["best_value"], "stopped_early": info["stopped_early"],
              **({"time_to_accuracy": [[r["train_time_s"], r["test_accuracy"]] for r in info["history"]]}
                 if config.test_every_epoch else {}),
              "compile_s": info["compile_s"], "devices": [d.device_kind for d in jax.devices()]}

    task = engine.Task(
        state=state, step=make_step(config, frozen_stats=frozen_stats, batch_sharding=batch_sharding),
        inputs=lambda epoch: (data, order_fn(data_key, epoch, num_train), step_key),
        steps_per_epoch=steps_per_epoch, epochs=config.epochs, evaluate=evaluate_epoch,
        describe=lambda epoch, step, row: f"epoch {epoch}/{config.epochs}  {_format_row(row)}",
        finish=finish, best=("val_accuracy", "max") if val_batched is not None else None,
        patience=config.early_stopping_patience,
        panels={"loss": ["train_loss", "val_loss", "test_loss"],
                "accuracy": ["train_accuracy", "val_accuracy", "test_accuracy"],
                **({"test accuracy against time": {"x": "train_time_s", "keys": ["test_accuracy"]}}
                   if config.test_every_epoch else {})},
        title=f"{config.model} on {dataset.name}", examples_per_step=config.batch_size,
        nan_policy=config.nan_policy, keep_checkpoints=config.keep_checkpoints,
        nan_hint="Lower --learning_rate, set --clip_norm, or pass --nan_policy=skip to skip such steps",
        log_every=config.log_every, mesh=mesh)
    return engine.run(task, workdir, record, progress=progress, log=log)
