"""Many seeds in one program: N independent replicas trained in one jitted vmap.

The course notes' "random restarts": the same model trained from several
random starts, reported as mean ± std. Replica r is the run `train.fit` would
do with seed `config.seed + r` on the same data and validation split: its own
initialisation, data order, augmentation and dropout, from its own key, with
one difference: the keys are threefry's, not rbg's (`core.PRNG_IMPL`).
Under vmap, rbg's draws for a key depend on its position in the batch (replica
1 would not draw what a lone run with its seed draws); threefry's do not, so
replica r is exactly the lone run with seed s + r and PRNG_IMPL threefry. The
replicas share the dataset on the device and one compiled step,
`vmap(train.make_step(...))` over the stacked states, so N small models fill
the machine better than N processes one after another.

    state, results = seeds.fit(dataclasses.replace(config, num_seeds=4))
    results['test_accuracy']  # {'mean': ..., 'std': ..., 'per_seed': [...]}

With several devices the replicas are spread over them, the same number on
each (`replica_mesh`): the stacked states are sharded along the replica
axis and the dataset is replicated, so the devices never exchange a value.
The loop is `jdl.engine.run`'s, so resume, SIGTERM, the non-finite guard
(per replica: a bad step leaves only its replica unchanged) and the
mid-epoch checkpoint work as for one seed. Early stopping is per run and so
not offered here; the figures are those after the last epoch.
"""
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jdl import engine, parallel, train, xla
from jdl.config import TrainConfig, validate
from jdl.data import Dataset, pipeline
from jdl.errors import ConfigError

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


def fit(config: TrainConfig, dataset: Optional[Dataset] = None, *, devices=None,
        progress: bool = True, log=print):
  """Trains `config.num_seeds` replicas at once; returns (stacked states, results).

  results.json holds each test metric as {'mean', 'std', 'per_seed'}.
  """
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
  dataset, train_split, val, (mean, std) = train.load_splits(config, dataset)
  num_train, num_classes = len(train_split[1]), dataset.num_classes
  steps_per_epoch = num_train // config.batch_size
  record = train.run_record(config, dataset, mean, std, task="classifier, many seeds")
  workdir = config.workdir or engine.default_workdir(config.dataset, config.model, seed=config.seed)
  with engine.workdir(workdir, record) as record:
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

    # vmap over replicas: states, orders and step keys; the data and the step index shared.
    step = jax.vmap(train.make_step(config), in_axes=(0, (None, 0, 0), None))
    eval_fn = xla.jit(jax.vmap(train.make_eval_fn(config, jit=False),
                               in_axes=(0, 0, None, None, None, None)))
    eval_stats = (data["mean"], data["std"])
    orders_fn = jax.jit(jax.vmap(pipeline.epoch_permutation, in_axes=(0, None, None)),
                        static_argnums=2)

    def evaluate(state, batched):  # each metric (N,)
      return train.evaluate(lambda *a: eval_fn(*a, eval_stats), state, batched, num_classes,
                            replicas=num_seeds)

    def evaluate_epoch(state, train_means):
      row = {}
      for k, v in train_means.items():
        row[f"train_{k}"], row[f"train_{k}_std"] = float(np.mean(v)), float(np.std(v))
      if val_batched is not None:
        for k, v in evaluate(state, val_batched).items():
          row[f"val_{k}"], row[f"val_{k}_std"] = float(np.mean(v)), float(np.std(v))
      row["learning_rate"] = float(schedule(int(np.asarray(state.step)[0])))
      return row

    def describe(epoch, step, row):
      val_text = (f"  val acc {row['val_accuracy']:.2%} ± {row['val_accuracy_std']:.2%}"
                  if "val_accuracy" in row else "")
      return (f"epoch {epoch}/{config.epochs}  train loss {row['train_loss']:.4f} ± "
              f"{row['train_loss_std']:.4f}{val_text}  {row['epoch_time_s']:.1f}s "
              f"({row['examples_per_s']:,.0f} ex/s over {num_seeds} replicas)")

    def finish(state, best, info):
      test = evaluate(state, test_batched)
      results = {"num_seeds": num_seeds, "seeds": list(range(config.seed, config.seed + num_seeds)),
                 "params_count_per_replica": int(sum(np.prod(x.shape[1:])
                                                     for x in jax.tree.leaves(state.params))),
                 "test_accuracy": _mean_std(test["accuracy"]), "test_loss": _mean_std(test["loss"])}
      log(f"test accuracy {results['test_accuracy']['mean']:.2%} ± "
          f"{results['test_accuracy']['std']:.2%} over {num_seeds} seeds; results in "
          f"{workdir}/results.json")
      return results

    task = engine.Task(
        state=states, step=step,
        inputs=lambda epoch: (data, orders_fn(data_keys, epoch, num_train), step_keys),
        steps_per_epoch=steps_per_epoch, epochs=config.epochs, evaluate=evaluate_epoch,
        describe=describe, finish=finish,
        panels={"loss (mean over seeds)": ["train_loss", "val_loss"],
                "accuracy (mean over seeds)": ["train_accuracy", "val_accuracy"]},
        title=f"{num_seeds} seeds of {config.model} on {dataset.name}",
        examples_per_step=config.batch_size * num_seeds, nan_policy=config.nan_policy,
        keep_checkpoints=config.keep_checkpoints, log_every=config.log_every,
        nan_hint=(f"Replica r is seed {config.seed} + r. Lower --learning_rate, set --clip_norm, "
                  "or pass --nan_policy=skip to skip such steps (per replica)"))
    return engine.run(task, workdir, record, progress=progress, log=log)
