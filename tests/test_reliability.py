"""Reliability: kill/resume, preemption, determinism, non-finite steps, damaged and untrusted files."""
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from interrupts import assert_same_run, metrics
from jdl import checkpoint, train
from jdl.config import TrainConfig
from jdl.data import load_dataset
from jdl.errors import CheckpointError, TrainingError
from jdl.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 400 shapes: 320 train (10 steps of 32 per epoch), 80 validation; 3 epochs = 30 steps.
# With augmentation, so the random crops and flips must resume exactly too.
FLAGS = ["--dataset=shapes", "--model=cnn", "--num_train=400", "--num_test=100", "--augment",
         "--batch_size=32", "--epochs=3", "--validation_fraction=0.2", "--log_every=1000"]


def _run(args, driver=None):
  command = [sys.executable, *(["tests/kill_driver.py", "experiments.cifar", *driver] if driver
                                else ["-m", "experiments.cifar"]), *args]
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def _has_temporary(workdir):
  return any("orbax-checkpoint-tmp" in name for name in os.listdir(os.path.join(workdir, "checkpoints")))


@pytest.mark.slow
def test_killed_and_preempted_run_resumes_bit_exactly(tmp_path):
  """The engine's whole kill chain, through the classifier: SIGKILLs at every
  kind of moment and a SIGTERM, then a finishing run equal to an uninterrupted one."""
  reference, chained = str(tmp_path / "reference"), str(tmp_path / "chained")
  result = _run([*FLAGS, f"--workdir={reference}"])
  assert result.returncode == 0, result.stderr[-2000:]

  args = [*FLAGS, f"--workdir={chained}"]
  # 1. SIGKILL right after epoch 1's checkpoint is saved.
  result = _run(args, ["save", "1"])
  assert result.returncode == -9, result.stderr[-2000:]
  assert os.listdir(os.path.join(chained, "checkpoints")) == ["10"]
  # 2. Resumes after epoch 1; SIGKILL in the middle of epoch 2 (its 5th step, step 15).
  result = _run(args, ["step", "5"])
  assert result.returncode == -9, result.stderr[-2000:]
  assert "Resuming from" in result.stdout and "epoch 1 done, step 10" in result.stdout
  # 3. Resumes after epoch 1 again; SIGKILL inside its first checkpoint commit (epoch 2's).
  result = _run(args, ["finalize", "1"])
  assert result.returncode == -9, result.stderr[-2000:]
  assert "epoch 1 done, step 10" in result.stdout
  assert _has_temporary(chained)
  # 4. The half-written checkpoint is ignored (and cleared); SIGTERM at step 15 saves there.
  result = _run(args, ["term", "5"])
  assert "epoch 1 done, step 10" in result.stdout, result.stdout[-2000:]
  assert result.returncode == 128 + 15, result.stderr[-2000:]
  assert re.search(r"stopped by SIGTERM at step 15 \(epoch 2, step 5 of 10\); checkpoint saved",
                   result.stderr), result.stderr[-2000:]
  assert not _has_temporary(chained)
  assert "15" in os.listdir(os.path.join(chained, "checkpoints"))
  # 5. Continues from step 15, inside epoch 2, to the end.
  result = _run(args)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "epoch 1 done and 5 steps of epoch 2, step 15" in result.stdout
  assert_same_run(reference, chained)
  results = [json.load(open(os.path.join(d, "results.json"))) for d in (reference, chained)]
  assert results[0]["test_accuracy"] == results[1]["test_accuracy"]
  assert results[0]["test_loss"] == results[1]["test_loss"]


# --- In-process properties on a tiny dataset (the compiled steps are cached). ---

SMALL = dict(dataset="shapes", model="cnn", batch_size=64, epochs=1, learning_rate=2e-3,
             validation_fraction=0.2, log_every=1000)


@pytest.fixture(scope="module")
def shapes_small():
  return load_dataset("shapes", num_train=640, num_test=256, seed=0)


def _fit(tmp_path, dataset, name="run", **overrides):
  config = TrainConfig(**{**SMALL, "workdir": str(tmp_path / name), **overrides})
  return train.fit(config, dataset, progress=False, log=lambda *a: None)


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))]


def test_same_seed_same_bits_other_seed_differs(tmp_path, shapes_small):
  a, _ = _fit(tmp_path, shapes_small, "a", validation_fraction=0.0)
  b, _ = _fit(tmp_path, shapes_small, "b", validation_fraction=0.0)
  c, _ = _fit(tmp_path, shapes_small, "c", validation_fraction=0.0, seed=1)
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, z) for x, z in zip(_leaves(a), _leaves(c)))


def test_nonfinite_step_changes_nothing_but_the_step():
  model = build_model("cnn")
  state = train.create_train_state(model, (32, 32, 3), optax.adam(1e-3), jax.random.key(0))
  images = jnp.zeros((4, 32, 32, 3)).at[0, 0, 0, 0].set(jnp.nan)
  new, metrics = jax.jit(train.train_step)(state, (images, jnp.arange(4)), jax.random.key(1))
  # (The loss may even come out finite, when ReLU/max-pool drop the NaN on the
  # way forward; its gradient does not. Either way the step is skipped.)
  assert int(metrics["status"]) in (1, 2)
  assert int(new.step) == 1
  for x, y in zip(_leaves(state), _leaves(new)):
    np.testing.assert_array_equal(x, y)
  good, metrics = jax.jit(train.train_step)(state, (jnp.zeros((4, 32, 32, 3)), jnp.arange(4)),
                                            jax.random.key(1))
  assert int(metrics["status"]) == 0
  assert any(not np.array_equal(x, y) for x, y in zip(_leaves(state), _leaves(good)))


def test_nan_policy_stop_names_the_step(tmp_path, shapes_small):
  # SGD at 1e30 makes the first update finite but enormous; step 2 overflows.
  with pytest.raises(TrainingError, match=r"non-finite loss at step 2 \(epoch 1\)"):
    _fit(tmp_path, shapes_small, optimizer="sgd", learning_rate=1e30)


def test_nan_policy_skip_counts_and_never_saves_a_nonfinite_best(tmp_path, shapes_small):
  state, results = _fit(tmp_path, shapes_small, optimizer="sgd", learning_rate=1e30,
                        nan_policy="skip", epochs=2)
  rows = metrics(str(tmp_path / "run"))
  assert [r["train_skipped_steps"] for r in rows] == [7.0, 8.0]  # 8 steps per epoch; step 1 was finite.
  assert results["best_val_accuracy"] is None and results["epochs_run"] == 2
  # No checkpoint is a candidate for the best: only the latest two are kept.
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["16", "8"]
  assert all(np.isfinite(x).all() for x in _leaves(state))


# --- Damaged and untrusted files. ---

def _digest(directory):
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for name in sorted(files):
      with open(os.path.join(root, name), "rb") as f:
        h.update(name.encode() + f.read())
  return h.hexdigest()


@pytest.fixture
def two_checkpoints(tmp_path, shapes_small):
  _fit(tmp_path, shapes_small, epochs=2, validation_fraction=0.0)
  ckpts = tmp_path / "run" / "checkpoints"
  assert sorted(os.listdir(ckpts)) == ["10", "20"]
  return ckpts


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "delete_metadata"])
def test_damaged_checkpoint_is_named_and_others_untouched(tmp_path, shapes_small, two_checkpoints, damage):
  latest = two_checkpoints / "20" / "state"
  before = _digest(two_checkpoints / "10")
  if damage == "delete_metadata":
    os.remove(latest / "_METADATA")
  else:
    data = max((p for p in latest.rglob("*") if p.is_file() and "/d/" in str(p)),
               key=lambda p: p.stat().st_size)  # The biggest array chunk file.
    raw = data.read_bytes()
    data.write_bytes(raw[:len(raw) // 2] if damage == "truncate" else bytes(b ^ 0xFF for b in raw))
  with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoints/20 is damaged or unreadable") as e:
    _fit(tmp_path, shapes_small, epochs=3, validation_fraction=0.0)
  assert "\n" not in str(e.value)
  assert _digest(two_checkpoints / "10") == before
  assert sorted(os.listdir(two_checkpoints)) == ["10", "20"]


def test_checkpoint_of_other_shapes_names_path_and_shapes(tmp_path, two_checkpoints):
  other = build_model("cnn", num_classes=7)
  target = train.create_train_state(other, (32, 32, 3), optax.adam(1e-3), jax.random.key(0))
  ckpts = checkpoint.Checkpoints(str(tmp_path / "run"))
  with pytest.raises(CheckpointError, match=r"params/head/bias is \(10,\) in the checkpoint but \(7,\) in the model"):
    ckpts.restore_latest(target)
  ckpts.close()


class _Payload:
  """Unpickling this runs `touch MARKER`: the test checks it never happens."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_pickle_in_place_of_a_checkpoint_is_refused_and_never_run(tmp_path, shapes_small, two_checkpoints):
  marker = tmp_path / "pwned"
  payload = pickle.dumps(_Payload(marker))
  latest = two_checkpoints / "20"
  for path in latest.rglob("*"):  # Every file of the newest checkpoint becomes the pickle.
    if path.is_file():
      path.write_bytes(payload)
  with pytest.raises(CheckpointError, match="checkpoints/20 is damaged or unreadable"):
    _fit(tmp_path, shapes_small, epochs=3, validation_fraction=0.0)
  assert not marker.exists()


def test_no_pickle_loading_in_jdl():
  """Static guard: no module of jdl can load pickle data."""
  pattern = re.compile(r"import pickle|from pickle|allow_pickle\s*=\s*True|cloudpickle|dill|"
                       r"torch\.load\((?![^)]*weights_only\s*=\s*True)|np\.load\((?![^)]*allow_pickle\s*=\s*False)")
  offenders = []
  for root, _, files in os.walk(os.path.join(ROOT, "jdl")):
    for name in files:
      if name.endswith(".py"):
        text = open(os.path.join(root, name)).read()
        offenders += [f"{name}: {m.group(0)}" for m in pattern.finditer(text)]
  assert not offenders
