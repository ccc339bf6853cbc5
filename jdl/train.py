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
The output head (--head: softmax, sigmoid, multilabel, regression) supplies
the loss, metrics and best-checkpoint criterion (`jdl.heads`); softmax is the
default and the classifier described here.
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

from jdl import engine, heads as heads_lib, losses, optim, parallel, xla
from jdl.config import TrainConfig, validate
from jdl.core import PRNG_IMPL, TrainState, apply_if_finite, init_variables, model_variables
from jdl.data import Dataset, augmentation, load_dataset, pipeline, split_validation
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
               l1: float = 0.0, l2: float = 0.0, top_k: int = 5, frozen_stats=None,
               head: Optional[heads_lib.Head] = None):
  """One gradient step on a batch. Pure: jit it, vmap it, scan it.

  A step whose loss or gradients are not finite changes nothing but the step
  counter: parameters, BatchNorm statistics and optimizer state stay as they
  were (`core.apply_if_finite`), and `metrics['status']` says why (the loop
  then stops or counts, as --nan_policy says).

  Arguments:
    state: the TrainState.
    batch: (images (B, H, W, C) float, labels (B,) int32, or as the head's
      dataset holds them).
    rng: key for dropout.
    label_smoothing, l1, l2: loss terms (see jdl.losses); static.
    top_k: also report top-k accuracy when there are more than k classes.
    frozen_stats: optional tree of Python bools like state.batch_stats; True
      leaves (BatchNorm statistics of frozen layers) keep their old values.
    head: the output head (`jdl.heads`); None: softmax with `top_k`.
  Returns:
    (new state, metrics dict of scalars: loss, the head's batch metrics
    (softmax: accuracy, [top5]), grad_norm, status: int32, 0 good, 1
    non-finite loss, 2 non-finite gradients).
    Metrics of a skipped step are those of the failed attempt (so they show
    what went wrong).
  """
  images, labels = batch
  head = head or heads_lib.Softmax(top_k=top_k)

  def loss_fn(params):
    (logits, _), updates = state.apply_fn(
        model_variables(state, params), images, train=True, rngs={"dropout": rng},
        mutable=["batch_stats"])
    data_loss = head.loss(logits, labels, label_smoothing).mean()
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
  metrics = {"loss": data_loss, **head.train_metrics(logits, labels),
             "grad_norm": grad_norm, "status": status}
  return state, metrics


def _eval_outputs(state: TrainState, batch, mask, head: heads_lib.Head):
  """(metric sums, per-example values the head gathers) of one padded batch."""
  images, labels = batch
  logits, _ = state.apply_fn(model_variables(state), images, train=False)
  return head.eval_sums(logits, labels, mask)


def eval_step(state: TrainState, batch, mask, *, top_k: int = 5,
              head: Optional[heads_lib.Head] = None) -> Dict[str, jax.Array]:
  """Metric SUMS over the real (mask == 1) examples of a padded batch.

  Arguments:
    state: the TrainState (BatchNorm uses its running statistics).
    batch: (images (B, H, W, C) float, labels (B,) int32).
    mask: (B,) float, 0 for padding.
    head: the output head (`jdl.heads`); None: softmax with `top_k`.
  """
  return _eval_outputs(state, batch, mask, head or heads_lib.Softmax(top_k=top_k))[0]


def make_step(config: TrainConfig, top_k: int = 5, frozen_stats=None, batch_sharding=None,
              head: Optional[heads_lib.Head] = None):
  """The task's step for `jdl.engine`: (state, inputs, index) -> (state, metrics).

  `inputs` = (data, order, step_key): data = {'images': uint8 (N, H, W, C) or
  float sequences, 'labels': (N,), 'mean', 'std': (C,) input normalisation} on
  the device, `order` the epoch's permutation (N,), and the run's step key;
  `index` is the step within the epoch. The batch is gathered, normalised and
  augmented on the device, then `train_step` updates. With `batch_sharding`
  (data parallel, see jdl.parallel) the gathered batch is split over the
  devices along its first axis. Unjitted: the engine jits it (and `jdl.seeds`
  vmaps it first). `head`: the output head (default: the one `config` names).
  """
  dtype = jnp.bfloat16 if config.precision == "bfloat16" else jnp.float32
  aug_spec = augmentation.AugmentSpec.from_config(config)
  step_fn = functools.partial(train_step, label_smoothing=config.label_smoothing,
                              l1=config.l1, l2=config.l2, top_k=top_k, frozen_stats=frozen_stats,
                              head=head or heads_lib.from_config(config, top_k))

  def step(state, inputs, index):
    data, order, step_key = inputs
    images, labels = pipeline.take_batch(data["images"], data["labels"], order, index,
                                         config.batch_size)
    images, labels = parallel.shard_batch((images, labels), batch_sharding)
    aug_key, dropout_key = jax.random.split(jax.random.fold_in(step_key, state.step))
    images = pipeline.normalize(images, data["mean"], data["std"], dtype)
    if config.augment:
      images = augmentation.augment(aug_key, images, aug_spec)
    return step_fn(state, (images, labels), dropout_key)

  return step


def make_eval_fn(config: TrainConfig, top_k: int = 5, batch_sharding=None, jit: bool = True,
                 head: Optional[heads_lib.Head] = None):
  """The jitted evaluation step: (state, sums, images, labels, mask, stats) ->
  (sums plus this batch's metric sums, the batch's per-example values the head
  gathers: {} but for the sigmoid head's logits); `jit=False`: the function
  unjitted, for a caller that jits it inside its own program (`jdl.seeds`
  vmaps it). `head`: the output head (default: the one `config` names)."""
  dtype = jnp.bfloat16 if config.precision == "bfloat16" else jnp.float32
  head = head or heads_lib.from_config(config, top_k)

  def eval_fn(state, sums, images, labels, mask, stats):
    images, labels, mask = parallel.shard_batch((images, labels, mask), batch_sharding)
    images = pipeline.normalize(images, *stats, dtype)
    batch_sums, gathered = _eval_outputs(state, (images, labels), mask, head)
    return jax.tree.map(jnp.add, sums, batch_sums), gathered

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
  labels = np.concatenate([labels, np.zeros((pad, *labels.shape[1:]), labels.dtype)])
  shape = lambda a: a.reshape(num_batches, batch_size, *a.shape[1:])
  return jax.device_put((shape(images), shape(labels), shape(mask)), sharding)


def eval_names(num_classes: int, top_k: int = 5):
  """The keys of eval_step's sums (softmax)."""
  return list(heads_lib.Softmax(top_k=top_k).sum_shapes(num_classes))


def evaluate(eval_fn, state: TrainState, batched, num_classes: int, replicas: int = 0,
             head: Optional[heads_lib.Head] = None):
  """Metrics of a split prepared by `batch_for_eval` (one host sync).

  Arguments:
    eval_fn: `make_eval_fn`'s function with its stats bound.
    state: the TrainState.
    batched: (images, labels, mask) from `batch_for_eval`.
    num_classes: the model's outputs.
    replicas: N stacked states (`jdl.seeds`): each metric is then an (N,) array.
    head: the output head eval_fn was made with (default softmax): it turns
      the sums (and gathered values) into the split's metrics.
  """
  head = head or heads_lib.Softmax()
  images, labels, mask = batched
  shape = (replicas,) if replicas else ()
  sums = {name: jnp.zeros(shape + s, jnp.float32) for name, s in head.sum_shapes(num_classes).items()}
  gathered = []
  for i in range(images.shape[0]):
    sums, values = eval_fn(state, sums, images[i], labels[i], mask[i])
    gathered.append(values)
  if gathered[0]:  # per-example values: the labels and mask come along
    sums, gathered, labels, mask = jax.device_get((sums, gathered, labels, mask))
  else:
    sums = jax.device_get(sums)
  return head.finish(sums, gathered, labels, mask, replicas)


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
  heads_lib.check(config.head, dataset.label_type, dataset.num_classes, dataset.name)
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


def _format_row(row: Dict[str, float], head: heads_lib.Head) -> str:
  """'train loss 0.1234 acc 95.00%  val loss ...  [test ...]  1.2s (9,000 ex/s)': the
  head's metrics (test's with --test_every_epoch)."""
  parts = [f"{split} {heads_lib.format_metrics(row, head.shown, f'{split}_')}"
           for split in ("train", "val", "test") if f"{split}_loss" in row]
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
    accuracy, or the metric `config.head` picks by, when there is a validation
    split) and the dict also written to WORKDIR/results.json.
  """
  validate(config)
  if config.num_seeds > 1:
    raise ConfigError("num_seeds > 1 trains several replicas: use jdl.seeds.fit "
                      "(experiments.cifar and sequence choose it by --num_seeds)")
  mesh = parallel.data_mesh(devices)
  dataset, train, val, (mean, std) = load_splits(config, dataset, mesh, input_stats)
  num_train, num_classes = len(train[1]), dataset.num_classes
  # The head learns what it needs from the training labels (regression: their
  # mean and std) and encodes every split's labels for the step.
  head = heads_lib.from_config(config).with_stats(train[1])
  train, val, test = head.encode(train), head.encode(val), head.encode(dataset.test)
  num_outputs = head.outputs(num_classes)
  steps_per_epoch = num_train // config.batch_size  # The remainder is dropped; order changes every epoch.
  record = {**run_record(config, dataset, mean, std), **head.record(),
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
    eval_batch_size = parallel.round_up(min(1000, max(len(test[1]), 1)), mesh)
    val_batched = batch_for_eval(val, eval_batch_size, replicated) if len(val[1]) else None
    test_batched = batch_for_eval(test, eval_batch_size, replicated)

    # --- Model, optimizer and state. ---
    model = model or build_classifier(config, num_outputs)
    summary = summarize(model, dataset.input_shape,
                        frozen=optim.path_matcher(frozen) if frozen else None)
    outputs = (f"{num_classes} classes" if head.name == "softmax"
               else f"{head.name} head, {num_outputs} output{'s' * (num_outputs > 1)}")
    log(f"Model {config.model} on {dataset.name} {dataset.input_shape}, {outputs}\n{summary}")
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
    eval_fn = functools.partial(
        parallel.within(mesh, make_eval_fn(config, batch_sharding=batch_sharding, head=head)),
        stats=(data["mean"], data["std"]))
    order_fn = jax.jit(pipeline.epoch_permutation, static_argnums=2)
    split_metrics = lambda state, batched: evaluate(eval_fn, state, batched, num_outputs, head=head)
    best_key, primary = f"val_{head.best[0]}", head.primary

    def evaluate_epoch(state, train_means):
      row = {f"train_{k}": float(v) for k, v in train_means.items()}
      if schedule is not None:
        row["learning_rate"] = float(schedule(int(state.step)))
      splits = [("val", val_batched)] if val_batched is not None else []
      if config.test_every_epoch:
        splits.append(("test", test_batched))
      for name, batched in splits:  # rows hold numbers; per-label lists are for results.json
        row.update({f"{name}_{k}": v for k, v in split_metrics(state, batched).items()
                    if not isinstance(v, list)})
      return row

    def finish(state, best, info):
      test_metrics = split_metrics(best, test_batched)
      shown = "  ".join(f"test {label} {test_metrics[key]:{fmt}}" for key, label, fmt in head.final
                        if key in test_metrics)
      tested = (f"best epoch {info['best_epoch']} by validation" if val_batched is not None
                else f"epoch {info['epochs_run']}: no validation split, the last epoch")
      log(f"{shown}  ({tested}); results in {workdir}/results.json")
      # softmax: test_accuracy, test_loss, [test_top5], best_val_accuracy, [time_to_accuracy].
      return {"dataset": {"name": dataset.name, "num_train": num_train, "num_val": len(val[1]),
                          "num_test": len(test[1]), "num_classes": num_classes},
              "params_count": summary.total_params, "trainable_params": summary.trainable_params,
              **{f"test_{k}": v for k, v in test_metrics.items()},
              f"best_{best_key}": info["best_value"], "stopped_early": info["stopped_early"],
              **({f"time_to_{primary}": [[r["train_time_s"], r.get(f"test_{primary}")]
                                         for r in info["history"]]}
                 if config.test_every_epoch else {}),
              "compile_s": info["compile_s"], "devices": [d.device_kind for d in jax.devices()]}

    task = engine.Task(
        state=state, step=make_step(config, frozen_stats=frozen_stats, batch_sharding=batch_sharding,
                                    head=head),
        inputs=lambda epoch: (data, order_fn(data_key, epoch, num_train), step_key),
        steps_per_epoch=steps_per_epoch, epochs=config.epochs, evaluate=evaluate_epoch,
        describe=lambda epoch, step, row: f"epoch {epoch}/{config.epochs}  {_format_row(row, head)}",
        finish=finish, best=(best_key, head.best[1]) if val_batched is not None else None,
        patience=config.early_stopping_patience,
        panels={"loss": ["train_loss", "val_loss", "test_loss"],
                **{name: [f"train_{name}", f"val_{name}", f"test_{name}"] for name in head.panels},
                **({f"test {primary} against time": {"x": "train_time_s", "keys": [f"test_{primary}"]}}
                   if config.test_every_epoch else {})},
        title=f"{config.model} on {dataset.name}", examples_per_step=config.batch_size,
        nan_policy=config.nan_policy, keep_checkpoints=config.keep_checkpoints,
        nan_hint="Lower --learning_rate, set --clip_norm, or pass --nan_policy=skip to skip such steps",
        log_every=config.log_every, mesh=mesh)
    return engine.run(task, workdir, record, progress=progress, log=log)
