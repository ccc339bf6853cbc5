"""The GAN, LSTM-classifier and many-seeds tasks on 1 and on 8 simulated CPU devices.

(Every task shards its batch the same way, through `parallel.shard_batch` in
its step; the GAN has BatchNorm in two networks, the LSTM splits its loops
over the devices, the seeds spread replicas. The text model trains on two
processes in test_parallel.py; colorization shards like the GAN.)

Run by tests/test_parallel.py in a subprocess, because the device count is
fixed when JAX starts: python tests/parallel_loops_driver.py WORKDIR
Prints one JSON object: per loop, the metrics rows of both runs, whether
the 8-device run said it was data parallel, and the one-line error for a
batch that does not split over 8 devices.
"""
import dataclasses
import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import jax  # noqa: E402

from jdl import cli, gan, parallel, seeds as seeds_lib, train  # noqa: E402
from jdl.config import TrainConfig  # noqa: E402
from jdl.data import load_dataset  # noqa: E402
from jdl.errors import ConfigError  # noqa: E402
from jdl.logs import read_jsonl  # noqa: E402
from jdl.ops import recurrence  # noqa: E402
from jdl.seeds import replica_mesh  # noqa: E402

SHARDED = []  # (shape, device count) of each batch array the traced steps split over devices
_shard_batch = parallel.shard_batch


def recording_shard_batch(tree, batch_sharding):
  if batch_sharding is not None:
    SHARDED.extend((list(x.shape), batch_sharding.mesh.size) for x in jax.tree.leaves(tree))
  return _shard_batch(tree, batch_sharding)


parallel.shard_batch = recording_shard_batch  # the loops call it as parallel.shard_batch
SPLITS = []  # (batch, data-axis devices) of each recurrent layer traced
_split_over_devices = recurrence.split_over_devices


def recording_split_over_devices(fn, x, valid, weights):
  SPLITS.append((x.shape[1], parallel.context_data_devices()))  # x: (T, B, F)
  return _split_over_devices(fn, x, valid, weights)


# jdl.ops.choices gives it to the recurrent layers (the loops_per_device kernel).
recurrence.split_over_devices = recording_split_over_devices


def run_both(name, fit, config_for, workdir):
  """fit on the first device and on all 8; the metrics rows and logs of each."""
  report = {}
  for label, devices in (("one", jax.devices()[:1]), ("eight", None)):
    lines = []
    del SHARDED[:], SPLITS[:]
    run_dir = os.path.join(workdir, name, label)
    fit(config_for(run_dir), devices=devices, progress=False, log=lines.append)
    report[label] = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    report[f"{label}_said_parallel"] = any("Data parallel over 8 devices" in str(line) for line in lines)
    report[f"{label}_sharded"] = list(SHARDED)
    report[f"{label}_recurrent_splits"] = sorted(set(SPLITS))  # JSON: lists
  try:
    fit(config_for(os.path.join(workdir, name, "uneven"), batch_size=12), devices=None,
        progress=False, log=lambda line: None)
  except ConfigError as e:
    report["uneven_batch_error"] = str(e)
  return report


def recurrences_split_over_devices():
  """Each cell (2 layers, bidirectional, with and without lengths) under an
  8-device mesh against no mesh: max |difference| of outputs and of every
  parameter and input gradient, and the largest such value."""
  import jax.numpy as jnp
  import numpy as np
  from jdl.models.rnn import RNN
  mesh = parallel.data_mesh()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 7, 5)), jnp.float32)  # (B, T, F): 2 sequences per device
  lengths = jnp.asarray(rng.integers(0, 8, 16), jnp.int32)  # 0 (empty) to 7 (full)
  report = {}
  for cell in ("lstm", "gru", "rnn"):
    model = RNN(cell=cell, hidden_size=6, num_layers=2, bidirectional=True,
                loop_runner=recurrence.split_over_devices)
    params = model.init(jax.random.key(0), x)["params"]
    for with_lengths in (False, True):
      args = (x, lengths) if with_lengths else (x,)

      def loss(params, x):
        ys, _ = model.apply({"params": params}, x, *args[1:])
        return jnp.sum(jnp.sin(ys)), ys
      fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
      (_, ys_1), grads_1 = fn(params, x)
      split_loops = str(jax.make_jaxpr(fn)(params, x)).count("shard_map")
      with jax.set_mesh(mesh):
        (_, ys_8), grads_8 = fn(params, x)
        split_loops_8 = str(jax.make_jaxpr(fn)(params, x)).count("shard_map")
      pairs = [(ys_1, ys_8)] + list(zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_8)))
      report[f"{cell}{'_lengths' if with_lengths else ''}"] = {
          "max_abs_diff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in pairs),
          "max_abs": max(float(np.max(np.abs(np.asarray(a)))) for a, _ in pairs),
          "split_loops": [split_loops, split_loops_8]}
  return report


def main(workdir):
  cli.enable_compilation_cache()  # $JDL_CACHE_DIR, set by tests/conftest.py
  shapes = load_dataset("shapes", num_train=96, num_test=64, seed=0)
  report = {"device_count": jax.device_count()}
  report["recurrences"] = recurrences_split_over_devices()

  # One scoring classifier for both GAN runs, so that only the GAN's steps differ.
  scorer_dir = os.path.join(workdir, "scorer")
  gan.train_scorer(gan.GANConfig(num_train=96, classifier_epochs=1), shapes, scorer_dir,
                   log=lambda line: None, devices=jax.devices()[:1])

  def gan_config(run_dir, batch_size=32):
    # 3 steps of batch 32 (4 per device), BatchNorm in both networks, DiffAugment.
    return gan.GANConfig(num_train=96, num_eval=32, g_width=16, d_width=8, latent_dim=8,
                         batch_size=batch_size, epochs=1, workdir=run_dir,
                         classifier_workdir=os.path.join(scorer_dir, "classifier"))
  report["gan"] = run_both("gan", lambda c, **kw: gan.fit(c, shapes, **kw), gan_config, workdir)

  # train.fit with an LSTM (experiments.sequence's loop): 160 MNIST-1D sequences.
  mnist1d = load_dataset("mnist1d")
  mnist1d = dataclasses.replace(mnist1d, train=tuple(a[:160] for a in mnist1d.train),
                                test=tuple(a[:40] for a in mnist1d.test))

  def sequence_config(run_dir, batch_size=16):
    return TrainConfig(dataset="mnist1d", model="lstm", epochs=2, batch_size=batch_size,
                       validation_fraction=0.2, log_every=1000, workdir=run_dir)
  report["sequence"] = run_both("sequence", lambda c, **kw: train.fit(c, mnist1d, **kw),
                                sequence_config, workdir)

  # 4 seeds: spread over 4 of the 8 devices, one replica on each.
  seeds = {}
  for label, devices in (("one", jax.devices()[:1]), ("eight", None)):
    lines = []
    run_dir = os.path.join(workdir, "seeds", label)
    config = TrainConfig(dataset="shapes", model="cnn", epochs=2, batch_size=16, num_seeds=4,
                         validation_fraction=0.2, log_every=1000, workdir=run_dir)
    states, results = seeds_lib.fit(config, shapes, devices=devices, progress=False, log=lines.append)
    seeds[label] = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    seeds[f"{label}_test"] = [results["test_loss"]["per_seed"], results["test_accuracy"]["per_seed"]]
    seeds[f"{label}_devices_of_params"] = len(jax.tree.leaves(states.params)[0].sharding.device_set)
    seeds[f"{label}_log"] = lines[0]
  seeds["mesh_sizes"] = {f"{n} on {d}": getattr(replica_mesh(n, jax.devices()[:d]), "size", 1)
                         for n, d in ((4, 8), (6, 4), (5, 2), (16, 8), (3, 8), (1, 8))}
  report["seeds"] = seeds
  print(json.dumps(report))


if __name__ == "__main__":
  main(sys.argv[1])
