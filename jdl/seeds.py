"""Many seeds in one program: N independent replicas trained in one jitted vmap.

The course notes' "random restarts": the same model trained from several
random starts, reported as mean ± std. Replica r is the run `train.fit` would
do with seed `config.seed + r` on the same data and validation split: its own
initialisation, data order, augmentation and dropout, from its own key, with
one difference: the keys are threefry's, not rbg's (`train.PRNG_IMPL`).
Under vmap, rbg's draws for a key depend on its position in the batch (replica
1 would not draw what a lone run with its seed draws); threefry's do not, so
replica r is exactly the lone run with seed s + r and PRNG_IMPL threefry. The
replicas share the dataset on the device and one compiled step,
`vmap(train_fn)` over the stacked states, so N small models fill the machine
better than N processes one after another.

    results = seeds.fit_seeds(dataclasses.replace(config, num_seeds=4))
    results['test_accuracy']  # {'mean': ..., 'std': ..., 'per_seed': [...]}

With several devices the replicas are spread over them, the same number on
each (`replica_mesh`): the stacked states are sharded along the replica
axis and the dataset is replicated, so the devices never exchange a value.

Each epoch ends with one checkpoint of the stacked states (rerunning resumes
at an epoch boundary). Early stopping is per run and so not offered here; the
figures are those after the last epoch.
"""
import dataclasses
import os
import sys
import time
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jdl import checkpoint, parallel, train, xla
from jdl.config import TrainConfig, validate
from jdl.data import Dataset, pipeline
from jdl.errors import ConfigError, TrainingError
from jdl.logs import MetricWriter, write_json


# vmap-invariant keys (see the module docstring); costs some compile time.
PRNG_IMPL = "threefry2x32"


def _mean_std(values) -> Dict[str, object]:
  values = [float(v) for v in values]
  return {"mean": float(np.mean(values)), "std": float(np.std(values)), "per_seed": values}


def replica_mesh(num_seeds: int, devices=None):
  """A mesh over the most devices (of `devices`, default all) that share the
  replicas evenly, or None when that is one device: 4 seeds on 8 devices use
  4 of them, 6 seeds on 4 devices use 3, 5 on 2 use 1."""
  devices = list(devices) if devices is not None else jax.devices()
  count = max(d for d in range(1, len(devices) + 1) if num_seeds % d == 0)
  return parallel.data_mesh(devices[:count])


def fit_seeds(config: TrainConfig, dataset: Optional[Dataset] = None, *, devices=None,
              progress: bool = True, log=print):
  """Trains `config.num_seeds` replicas at once; returns (stacked states, results).

  results.json holds each metric as {'mean', 'std', 'per_seed'}.
  """
  from tqdm import tqdm
  start_time = time.time()
  validate(config)
  num_seeds = config.num_seeds
  if config.early_stopping_patience:
    raise ConfigError("--num_seeds > 1 trains every replica for --epochs; drop --early_stopping_patience")
  if jax.process_count() > 1:
    raise ConfigError("--num_seeds > 1 runs in one process (on all of its devices); "
                      "multi-host runs take one seed")
  mesh = replica_mesh(num_seeds, devices)
  # The replica axis (0 of every stacked array) is the mesh's one axis.
  replicated, by_replica = parallel.shardings(mesh)
  workdir, created = train.prepare_workdir(config)
  dataset, train_split, val, (mean, std) = train.start_run(config, dataset, workdir, created)
  num_train, num_classes = len(train_split[1]), dataset.num_classes
  steps_per_epoch = num_train // config.batch_size
  data = parallel.replicate({"images": train_split[0], "labels": train_split[1], "mean": mean,
                             "std": std}, mesh)
  eval_batch_size = min(1000, max(len(dataset.test[1]), 1))
  val_batched = train.batch_for_eval(val, eval_batch_size, replicated) if len(val[1]) else None
  test_batched = train.batch_for_eval(dataset.test, eval_batch_size, replicated)

  # --- N states, each from the keys train.fit would derive from its seed. ---
  model = train.build_classifier(config, num_classes)
  tx, schedule = train.build_optimizer(config, steps_per_epoch * config.epochs, steps_per_epoch)
  seeds = jnp.arange(config.seed, config.seed + num_seeds)
  keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s, impl=PRNG_IMPL), 3))(seeds)  # (N, 3)
  init_keys, data_keys, step_keys = keys[:, 0], keys[:, 1], keys[:, 2]
  states = jax.vmap(lambda k: train.create_train_state(model, dataset.input_shape, tx, k))(init_keys)
  # Before restoring, which keeps these shardings.
  states, data_keys, step_keys = jax.device_put((states, data_keys, step_keys), by_replica)
  log(f"{num_seeds} replicas of {config.model} (seeds {config.seed}..{config.seed + num_seeds - 1}) "
      f"on {dataset.name}, one vmapped step"
      + (f", {num_seeds // mesh.size} on each of {mesh.size} devices" if mesh is not None else ""))

  ckpts = checkpoint.Checkpoints(workdir, config.keep_checkpoints)
  meta = {"epoch": 0, "train_time_s": 0.0}
  restored = ckpts.restore_latest(states)
  if restored is not None:
    states, saved = restored
    meta.update(saved)
    log(f"Resuming from {workdir}: epoch {meta['epoch']} done")
  writer = MetricWriter(workdir, meta["epoch"])

  # vmap over replicas: states, sums, orders and step keys; data and the step index shared.
  train_fn = xla.jit(jax.vmap(train.make_train_fn(config, jit=False), in_axes=(0, 0, None, 0, None, 0)),
                     donate_argnums=(0, 1))
  eval_one = train.make_eval_fn(config, jit=False)
  eval_fn = xla.jit(jax.vmap(eval_one, in_axes=(0, 0, None, None, None, None)))
  orders_fn = jax.jit(jax.vmap(pipeline.epoch_permutation, in_axes=(0, None, None)),
                      static_argnums=2)
  names = train.metric_names(num_classes, train=True)

  def evaluate(batched):
    images, labels, mask = batched
    sums = jax.device_put({k: jnp.zeros((num_seeds,), jnp.float32)
                           for k in train.metric_names(num_classes, train=False)}, by_replica)
    for i in range(images.shape[0]):
      sums = eval_fn(states, sums, images[i], labels[i], mask[i], (data["mean"], data["std"]))
    sums = jax.device_get(sums)
    count = np.maximum(sums.pop("count"), 1.0)
    return {k: v / count for k, v in sums.items()}  # each (N,)

  for epoch in range(meta["epoch"] + 1, config.epochs + 1):
    epoch_start = time.time()
    orders = orders_fn(data_keys, epoch, num_train)  # (N, num_train)
    sums = jax.device_put({k: jnp.zeros((num_seeds,), jnp.float32) for k in names}, by_replica)
    with tqdm(total=steps_per_epoch * config.batch_size * num_seeds, unit="ex", unit_scale=True,
              desc=f"epoch {epoch}/{config.epochs} x{num_seeds}", disable=not progress,
              leave=False, file=sys.stderr, mininterval=0.5) as bar:
      for index in range(steps_per_epoch):
        states, sums, status = train_fn(states, sums, data, orders, index, step_keys)
        del status  # per step; the skip counts in `sums` are checked at log points instead
        if (index + 1) % config.log_every == 0 or index + 1 == steps_per_epoch:
          bad = np.flatnonzero(jax.device_get(sums["skipped"]))  # a sync at log points only
          if len(bad) and config.nan_policy == "stop":
            raise TrainingError(f"non-finite loss or gradients in replica {int(bad[0])} (seed "
                                f"{config.seed + int(bad[0])}) by step {index + 1} of epoch {epoch}; "
                                "that update was not applied. Lower --learning_rate or pass "
                                "--nan_policy=skip")
        bar.update(config.batch_size * num_seeds)
    sums = jax.device_get(sums)
    epoch_time = time.time() - epoch_start
    good = np.maximum(steps_per_epoch - sums.pop("skipped"), 1)
    row = {}
    for k, v in sums.items():
      row[f"train_{k}"] = float(np.mean(v / good))
      row[f"train_{k}_std"] = float(np.std(v / good))
    if val_batched is not None:
      for k, v in evaluate(val_batched).items():
        row[f"val_{k}"], row[f"val_{k}_std"] = float(np.mean(v)), float(np.std(v))
    row.update(learning_rate=float(schedule(epoch * steps_per_epoch)), epoch_time_s=epoch_time,
               examples_per_s=steps_per_epoch * config.batch_size * num_seeds / epoch_time)
    meta.update(epoch=epoch, train_time_s=meta["train_time_s"] + epoch_time)
    writer.write(epoch * steps_per_epoch, epoch, row)
    ckpts.save_latest(epoch * steps_per_epoch, states, meta)
    val_text = (f"  val acc {row['val_accuracy']:.2%} ± {row['val_accuracy_std']:.2%}"
                if "val_accuracy" in row else "")
    log(f"epoch {epoch}/{config.epochs}  train loss {row['train_loss']:.4f} ± "
        f"{row['train_loss_std']:.4f}{val_text}  {epoch_time:.1f}s "
        f"({row['examples_per_s']:,.0f} ex/s over {num_seeds} replicas)")

  test = evaluate(test_batched)
  writer.close()
  ckpts.close()
  results = {
      "config": dataclasses.asdict(config),
      "num_seeds": num_seeds,
      "seeds": list(range(config.seed, config.seed + num_seeds)),
      "params_count_per_replica": int(sum(np.prod(x.shape[1:]) for x in jax.tree.leaves(states.params))),
      "test_accuracy": _mean_std(test["accuracy"]),
      "test_loss": _mean_std(test["loss"]),
      "epochs_run": meta["epoch"],
      "train_time_s": meta["train_time_s"],
      "wall_time_s": time.time() - start_time,
  }
  write_json(os.path.join(workdir, "results.json"), results)
  log(f"test accuracy {results['test_accuracy']['mean']:.2%} ± {results['test_accuracy']['std']:.2%} "
      f"over {num_seeds} seeds; results in {workdir}/results.json")
  return states, results
