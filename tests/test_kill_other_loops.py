"""SIGKILL and SIGTERM in the gan, text and colorize loops, then resume (issue 7, property 1 and 2).

Each test runs the experiment once uninterrupted, then the same command as a
chain of processes that `tests/kill_driver.py` stops at chosen points:
  1. SIGKILL in the middle of the second epoch (or segment), after a checkpoint;
  2. rerun: resumes, SIGKILL inside its first checkpoint commit (half written);
  3. rerun: the half-written checkpoint is ignored, SIGTERM mid-epoch saves there;
  4. rerun: continues from that step to the end.
The chained run's final checkpoint must equal the uninterrupted one bit for bit,
and its metrics rows must be the same. (The cifar/sequence/transfer loop has its
own chain in test_reliability.py.)
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from test_gan_experiment import check_entrypoint_outputs
from test_reliability import ROOT, _metrics, _stored

pytestmark = pytest.mark.slow


def _run(experiment, args, driver=()):
  command = ([sys.executable, "tests/kill_driver.py", experiment, *driver] if driver
             else [sys.executable, "-m", experiment])
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=env)


def _has_temporary(workdir):
  return any("orbax-checkpoint-tmp" in name for sub in ("checkpoints", "best")
             if os.path.isdir(os.path.join(workdir, sub))
             for name in os.listdir(os.path.join(workdir, sub)))


def _chain(experiment, flags, reference, chained, kill_look, term_look, term_message):
  """Runs the four interrupted processes described above and compares with `reference`."""
  args = [*flags, f"--workdir={chained}"]
  result = _run(experiment, args, ("look", str(kill_look)))
  assert result.returncode == -9, result.stderr[-2000:]
  assert os.listdir(os.path.join(chained, "checkpoints")), "no checkpoint before the kill"

  result = _run(experiment, args, ("finalize", "1"))
  assert result.returncode == -9, result.stderr[-2000:]
  assert "Resuming from" in result.stdout, result.stdout[-2000:]
  assert _has_temporary(chained)

  result = _run(experiment, args, ("lookterm", str(term_look)))
  assert result.returncode == 128 + 15, result.stderr[-2000:]
  assert re.search(term_message, result.stderr), result.stderr[-2000:]
  assert not _has_temporary(chained)

  result = _run(experiment, args)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Resuming from" in result.stdout

  for sub in ("checkpoints", "best"):
    if not os.path.isdir(os.path.join(reference, sub)) or not os.listdir(os.path.join(reference, sub)):
      continue
    (step_a, a), (step_b, b) = _stored(os.path.join(reference, sub)), _stored(os.path.join(chained, sub))
    assert step_a == step_b and a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"{sub} {key}")
  assert _metrics(reference) == _metrics(chained)
  return [json.load(open(os.path.join(d, "results.json"))) for d in (reference, chained)]


def test_gan_loop_survives_kills(tmp_path):
  # 128 images, batch 32: 4 steps per epoch, 2 epochs. The GAN loop looks at its
  # stop flag once per step; the scoring cnn comes from the reference run.
  reference, chained = str(tmp_path / "reference"), str(tmp_path / "chained")
  flags = ["--num_train=128", "--num_eval=64", "--g_width=16", "--d_width=8", "--batch_size=32",
           "--latent_dim=8", "--epochs=2", "--classifier_epochs=1"]
  result = _run("experiments.gan", [*flags, f"--workdir={reference}"])
  assert result.returncode == 0, result.stderr[-2000:]
  check_entrypoint_outputs(reference, result.stdout, epochs=2)  # the entrypoint's smoke test
  flags.append(f"--classifier_workdir={os.path.join(reference, 'classifier')}")
  # SIGKILL after step 6 (epoch 2); after resuming at step 4, SIGTERM after step 5.
  ref, got = _chain("experiments.gan", flags, reference, chained, kill_look=6, term_look=1,
                    term_message=r"stopped by SIGTERM at step 5 \(epoch 2\); checkpoint saved")
  assert ref["frechet_distance_by_epoch"] == got["frechet_distance_by_epoch"]
  assert ref["final_losses"] == got["final_losses"]


def test_text_loop_survives_kills(tmp_path):
  # 12 steps, a checkpoint every 4; the SIGTERM lands between checkpoints.
  text_file = tmp_path / "rhyme.txt"
  text_file.write_text("the cat sat on the mat; the dog sat on the log.\n" * 40, encoding="utf-8")
  reference, chained = str(tmp_path / "reference"), str(tmp_path / "chained")
  flags = [f"--text_file={text_file}", "--embed_dim=8", "--hidden_size=16", "--num_layers=1",
           "--dropout=0", "--seq_len=16", "--batch_size=4", "--steps=12", "--eval_every=4",
           "--sample_length=20", "--log_every=1000"]
  result = _run("experiments.text", [*flags, f"--workdir={reference}"])
  assert result.returncode == 0, result.stderr[-2000:]
  # The text loop looks twice after each step, three times at a checkpoint step:
  # look 12 is the first after step 6 (kill); after resuming at step 4, look 3 is
  # the first after step 6 (SIGTERM).
  ref, got = _chain("experiments.text", flags, reference, chained, kill_look=12, term_look=3,
                    term_message=r"stopped by SIGTERM at step 6; checkpoint saved")
  assert ref["val_bpc"] == got["val_bpc"] and ref["samples"] == got["samples"]


def test_colorize_loop_survives_kills(tmp_path):
  # 64 images, batch 16: 4 steps per epoch, 2 epochs; one look per step.
  reference, chained = str(tmp_path / "reference"), str(tmp_path / "chained")
  flags = ["--num_train=64", "--num_test=16", "--width=8", "--batch_size=16", "--epochs=2"]
  result = _run("experiments.colorize", [*flags, f"--workdir={reference}"])
  assert result.returncode == 0, result.stderr[-2000:]
  results = json.loads(open(os.path.join(reference, "results.json")).read())  # the entrypoint's smoke test
  assert {"test_mse", "mean_colour_mse", "beats_mean_colour"} <= set(results)
  assert os.path.exists(os.path.join(reference, "comparison.png"))
  assert "Total params" in result.stdout
  ref, got = _chain("experiments.colorize", flags, reference, chained, kill_look=6, term_look=2,
                    term_message=r"stopped by SIGTERM at step 6 \(epoch 2\); checkpoint saved")
  assert ref["test_mse"] == got["test_mse"]
