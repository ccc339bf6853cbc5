"""experiments.colorize: luma, baselines, the task on tiny data, SIGTERM and resume, errors, the entrypoint."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from interrupts import assert_same_run, sigterm_at_step
from jdl import colorize
from jdl.data import Dataset, load_dataset
from jdl.errors import ConfigError, Interrupted
from jdl.images import to_unit_range

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grey_is_bt601_luma():
  # Pure red, green, blue and white on the [-1, 1] scale.
  colours = jnp.asarray([[[[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1]]]])  # (1, 1, 4, 3)
  grey = np.asarray(colorize.to_grey(colours))[0, 0, :, 0]
  # On [0, 1]: 0.299, 0.587, 0.114, 1; on [-1, 1]: 2v - 1.
  np.testing.assert_allclose(grey, [2 * 0.299 - 1, 2 * 0.587 - 1, 2 * 0.114 - 1, 1.0], atol=1e-6)


@pytest.fixture(scope="module")
def tiny_shapes():
  return load_dataset("shapes", num_train=64, num_test=16, seed=0)


def tiny_config(tmp_path, **overrides):
  values = dict(width=8, batch_size=16, epochs=1, workdir=str(tmp_path / "run"))
  values.update(overrides)
  return colorize.ColorizeConfig(**values)


def test_untrained_model_starts_at_the_grey_copy(tiny_shapes, tmp_path):
  import jax
  model = colorize.Colorizer((32, 32, 3), width=8)
  images = to_unit_range(tiny_shapes.test[0][:4])
  variables = jax.jit(model.init)(jax.random.key(0), colorize.to_grey(images))
  predicted = jax.jit(model.apply)(variables, colorize.to_grey(images))
  grey = np.broadcast_to(np.asarray(colorize.to_grey(images)), predicted.shape)
  # Decoder weights ~ N(0, 0.02): the offset is small, the output near the grey copy.
  assert np.abs(np.asarray(predicted) - grey).mean() < 0.05


def test_fit_writes_comparison_and_reports_baselines(tiny_shapes, tmp_path):
  results = colorize.fit(tiny_config(tmp_path, epochs=2), tiny_shapes, progress=False, log=lambda *a: None)
  assert results["epochs_run"] == 2
  rows = [json.loads(l) for l in open(os.path.join(tmp_path, "run", "metrics.jsonl"))]
  assert [r["epoch"] for r in rows] == [1, 2]
  # The mean-colour baseline, recomputed independently on the [0, 1] scale.
  train = tiny_shapes.train[0].astype(np.float64) / 255
  test = tiny_shapes.test[0].astype(np.float64) / 255
  mean = train.reshape(-1, 3).mean(0)
  assert results["mean_colour_mse"] == pytest.approx(np.mean((test - mean) ** 2), rel=1e-4)
  grey = test @ colorize.LUMA.astype(np.float64)
  assert results["grey_copy_mse"] == pytest.approx(np.mean((test - grey[..., None]) ** 2), rel=1e-4)
  assert np.isfinite(results["test_mse"])
  png = Image.open(results["comparison"])
  # 8 images per row, enlarged 3x (96 px), rows grey/predicted/true, their labels on the left.
  assert png.size[1] == 3 * 98 + 2 and png.size[0] > 8 * 98 + 2 + 40


def test_bad_colorize_input(tiny_shapes, tmp_path):
  grey_set = Dataset("grey", (np.zeros((32, 28, 28, 1), np.uint8), np.zeros(32, np.int32)),
                     (np.zeros((4, 28, 28, 1), np.uint8), np.zeros(4, np.int32)), 10, None)
  with pytest.raises(ConfigError, match="needs RGB images"):
    colorize.fit(tiny_config(tmp_path), grey_set, progress=False, log=lambda *a: None)
  with pytest.raises(ConfigError, match="batch_size 100 is larger"):
    colorize.fit(tiny_config(tmp_path, batch_size=100), tiny_shapes, progress=False, log=lambda *a: None)
  with pytest.raises(ConfigError, match="learning_rate must be > 0"):
    colorize.validate_config(colorize.ColorizeConfig(learning_rate=-1.0))


def test_nonfinite_steps_stop_or_are_skipped(tiny_shapes, tmp_path):
  from jdl.errors import TrainingError
  quiet = dict(progress=False, log=lambda *a: None)
  # Adam at 1e30 moves every weight by ~1e30 in step 1; step 2's loss overflows.
  with pytest.raises(TrainingError, match=r"non-finite (loss|gradients.*) at step 2 \(epoch 1\)"):
    colorize.fit(tiny_config(tmp_path, learning_rate=1e30), tiny_shapes, **quiet)
  assert not os.path.exists(tmp_path / "run")  # a failed start leaves nothing behind
  results = colorize.fit(tiny_config(tmp_path, learning_rate=1e30, nan_policy="skip", epochs=2,
                                     workdir=str(tmp_path / "skip")), tiny_shapes, **quiet)
  rows = [json.loads(l) for l in open(tmp_path / "skip" / "metrics.jsonl")]
  # 4 steps per epoch; only step 1 was applied, every later one is skipped.
  assert [r["train_skipped_steps"] for r in rows] == [3.0, 4.0]
  assert np.isfinite(rows[0]["train_mse"]) and results["epochs_run"] == 2


def test_sigterm_mid_epoch_resumes_bit_exactly(tiny_shapes, tmp_path, monkeypatch):
  """Colorization is wired through the engine: stopped inside epoch 2, resumed, equal to one run."""
  quiet = dict(progress=False, log=lambda *a: None)
  reference = colorize.fit(tiny_config(tmp_path / "a", epochs=2), tiny_shapes, **quiet)
  sigterm_at_step(monkeypatch, 6)  # 64 images, batch 16: 4 steps per epoch
  with pytest.raises(Interrupted, match=r"stopped by SIGTERM at step 6 \(epoch 2, step 2 of 4\)"):
    colorize.fit(tiny_config(tmp_path / "b", epochs=2), tiny_shapes, **quiet)
  monkeypatch.undo()
  resumed = colorize.fit(tiny_config(tmp_path / "b", epochs=2), tiny_shapes, **quiet)
  assert_same_run(str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"))
  assert resumed["test_mse"] == reference["test_mse"]


def test_colorize_entrypoint_smoke(tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run([sys.executable, "-m", "experiments.colorize", "--num_train=64",
                           "--num_test=16", "--width=8", "--batch_size=16", "--epochs=1",
                           f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  results = json.loads((workdir / "results.json").read_text())
  assert {"test_mse", "mean_colour_mse", "beats_mean_colour"} <= set(results)
  assert (workdir / "comparison.png").exists() and (workdir / "learning_curves.png").exists()
  assert "Total params" in result.stdout
