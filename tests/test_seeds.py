"""--num_seeds: N replicas in one vmapped program equal N separate runs."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from interrupts import assert_same_run, metrics, sigterm_at_step
from jdl import seeds, train
from jdl.config import TrainConfig
from jdl.data import load_dataset
from jdl.errors import ConfigError, Interrupted, TrainingError


@pytest.fixture(scope="module")
def tiny():
  return load_dataset("shapes", num_train=96, num_test=32, seed=0)


def test_replicas_equal_separate_runs_and_report_mean_and_std(tmp_path, tiny, monkeypatch):
  # mlp with dropout: each replica needs its own init, data order and dropout masks.
  config = TrainConfig(dataset="shapes", model="mlp", epochs=2, batch_size=16, validation_fraction=0.0,
                       num_seeds=2, seed=3, workdir=str(tmp_path / "seeds"), log_every=1000)
  quiet = dict(progress=False, log=lambda line: None)
  states, results = seeds.fit(config, tiny, **quiet)
  assert results["seeds"] == [3, 4] and results["epochs_run"] == 2
  # The lone runs with the replicas' key implementation (see jdl.seeds).
  monkeypatch.setattr(train, "PRNG_IMPL", seeds.PRNG_IMPL)
  for r, seed in enumerate((3, 4)):
    # fit(seed=4) would also shuffle the stored training split by its seed; the
    # replicas share seed 3's split, so lay the data out for seed 4 to see it too.
    order_3 = np.random.default_rng(3).permutation(96)
    order_seed = np.random.default_rng(seed).permutation(96)
    laid_out = [np.empty_like(a) for a in tiny.train]
    for out, a in zip(laid_out, tiny.train):
      out[order_seed] = a[order_3]
    data = dataclasses.replace(tiny, train=tuple(laid_out))
    single, single_results = train.fit(dataclasses.replace(config, num_seeds=1, seed=seed,
                                                           workdir=str(tmp_path / f"s{seed}")), data, **quiet)
    for a, b in zip(jax.tree.leaves(states.params), jax.tree.leaves(single.params)):
      # Batched matmuls sum in another order; Adam turns those ~1e-7 differences
      # into up to ~5e-6 where a gradient is near zero (6 of 512,000 kernel entries).
      np.testing.assert_allclose(np.asarray(a)[r], np.asarray(b), rtol=1e-5, atol=2e-5)
    # At most one of the 32 test images may flip on a near-tie.
    assert results["test_accuracy"]["per_seed"][r] == pytest.approx(single_results["test_accuracy"],
                                                                    abs=1 / 32 + 1e-6)
  kernels = jax.tree.leaves(states.params)[0]
  assert not np.allclose(kernels[0], kernels[1])  # different seeds differ
  acc = results["test_accuracy"]
  assert acc["mean"] == pytest.approx(np.mean(acc["per_seed"]))
  assert acc["std"] == pytest.approx(np.std(acc["per_seed"]))
  monkeypatch.undo()
  saved = json.loads((tmp_path / "seeds" / "results.json").read_text())
  assert saved["test_accuracy"] == acc
  # Rerunning resumes from the last epoch's checkpoint and repeats the figures.
  lines = []
  _, again = seeds.fit(config, tiny, progress=False, log=lines.append)
  assert any(line.startswith("Resuming") for line in lines)
  assert again["test_accuracy"] == acc


def test_num_seeds_refuses_what_it_cannot_do(tmp_path, tiny):
  with pytest.raises(ConfigError, match="drop --early_stopping_patience"):
    seeds.fit(TrainConfig(dataset="shapes", num_seeds=2, early_stopping_patience=2,
                          workdir=str(tmp_path / "a")), tiny)
  with pytest.raises(ConfigError, match="num_seeds must be >= 1"):
    seeds.fit(TrainConfig(dataset="shapes", num_seeds=0, workdir=str(tmp_path / "b")), tiny)
  with pytest.raises(ConfigError, match="use jdl.seeds.fit"):
    train.fit(TrainConfig(dataset="shapes", num_seeds=2, workdir=str(tmp_path / "c")), tiny)
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "c")


def test_seeds_stop_on_sigterm_resume_exactly_and_guard_each_replica(tmp_path, tiny, monkeypatch):
  """--num_seeds runs through the engine: SIGTERM mid-epoch and resume equal one run;
  a non-finite step is refused per replica (stop names it, skip counts it)."""
  quiet = dict(progress=False, log=lambda *a: None)
  config = lambda name, **kw: TrainConfig(**{**dict(
      dataset="shapes", model="mlp", epochs=2, batch_size=16, validation_fraction=0.0, num_seeds=2,
      log_every=1000, workdir=str(tmp_path / name)), **kw})
  seeds.fit(config("reference"), tiny, **quiet)
  sigterm_at_step(monkeypatch, 8)  # 96 images, batch 16: 6 steps per epoch
  with pytest.raises(Interrupted, match=r"stopped by SIGTERM at step 8 \(epoch 2, step 2 of 6\)"):
    seeds.fit(config("chained"), tiny, **quiet)
  monkeypatch.undo()
  seeds.fit(config("chained"), tiny, **quiet)
  assert_same_run(str(tmp_path / "reference"), str(tmp_path / "chained"))

  # SGD at 1e30: step 1 is finite but enormous, step 2 overflows in both replicas.
  with pytest.raises(TrainingError, match=r"non-finite loss at step 2 \(epoch 1\) in replica 0"):
    seeds.fit(config("stop", optimizer="sgd", learning_rate=1e30), tiny, **quiet)
  _, results = seeds.fit(config("skip", optimizer="sgd", learning_rate=1e30, nan_policy="skip"),
                         tiny, **quiet)
  rows = metrics(str(tmp_path / "skip"))
  assert [r["train_skipped_steps"] for r in rows] == [10.0, 12.0]  # 5 + 5, then 6 + 6 over 2 replicas
  assert results["epochs_run"] == 2
