"""Smoke runs of every entrypoint as a user runs them, and their error paths."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(module, *args, timeout=240):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def test_cifar_on_shapes_smoke(tmp_path):
  workdir = tmp_path / "run"
  result = run("experiments.cifar", "--dataset=shapes", "--model=cnn", "--epochs=1",
               "--num_train=640", "--num_test=200", "--batch_size=64", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Total params: 528,054" in result.stdout
  assert "epoch 1/1" in result.stdout
  results = json.loads((workdir / "results.json").read_text())
  assert results["epochs_run"] == 1 and 0.0 <= results["test_accuracy"] <= 1.0
  assert (workdir / "learning_curves.png").stat().st_size > 1000
  # Rerunning the finished run resumes and does no more epochs.
  again = run("experiments.cifar", "--dataset=shapes", "--model=cnn", "--epochs=1",
              "--num_train=640", "--num_test=200", "--batch_size=64", f"--workdir={workdir}")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Resuming" in again.stdout and "epoch 1/1" not in again.stdout


def test_preset_smoke(tmp_path):
  result = run("experiments.cifar", "--preset=keras_mlp", "--dataset=shapes", "--epochs=1",
               "--num_train=320", "--num_test=100", f"--workdir={tmp_path / 'mlp'}")
  assert result.returncode == 0, result.stderr[-3000:]
  config = json.loads((tmp_path / "mlp" / "results.json").read_text())["config"]
  assert (config["model"], config["optimizer"], config["batch_size"], config["epochs"]) == \
      ("mlp", "rmsprop", 32, 1)


@pytest.mark.parametrize("args,message", [
    (["--model=resnet99"], "error: unknown model 'resnet99'; choose one of:"),
    (["--learning_rate=-1"], "error: learning_rate must be > 0"),
    (["--dropout=1.5"], "error: dropout must be in [0, 1)"),
    (["--batch_size=100000", "--num_train=300"], "error: batch_size 100000 is larger than the training split"),
    (["--preset=keras"], "error: unknown preset 'keras'"),
])
def test_bad_flags_are_one_line_errors(tmp_path, args, message):
  result = run("experiments.cifar", "--dataset=shapes", f"--workdir={tmp_path / 'w'}", *args)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # One line.
  assert result.stderr.startswith(message), result.stderr
  assert "Traceback" not in result.stderr + result.stdout


def test_offline_tfds_dataset_fails_fast_with_one_line(tmp_path):
  start = time.time()
  result = run("experiments.cifar", "--dataset=cifar10", f"--data_dir={tmp_path / 'data'}",
               f"--workdir={tmp_path / 'w'}")
  assert result.returncode == 2
  line = result.stderr.strip()
  assert "\n" not in line and "Traceback" not in line
  assert "'cifar10'" in line and str(tmp_path / "data") in line and "--dataset=shapes" in line
  assert time.time() - start < 60  # Seconds, not network retries (imports included).


def test_xor_entrypoint_solves_xor():
  result = run("experiments.xor")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  verdicts = [l for l in lines if "task" in l]
  assert len(verdicts) == 3
  assert "no hidden layer, task first_input: solved" in verdicts[0]
  assert "no hidden layer, task xor: NOT solved" in verdicts[1]
  assert "hidden layer of 4 sigmoid units, task xor: solved" in verdicts[2]


def test_xor_notes_mode_prints_the_notes_figures():
  result = run("experiments.xor", "--notes")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [l.strip() for l in result.stdout.splitlines()]
  # The notes' printed outputs, to the digit.
  assert "output [.0097 .0079 .9936 .9921]  (notes: [.0097 .0079 .9936 .9921])" in lines
  assert "output [.0026 .9967 .997 .0039]  (notes: [.0026 .9967 .997 .0039])" in lines
  # The error every 10,000 iterations, as the NumPy program prints it (Python 2's str(float)).
  errors = [l.split()[0] for l in lines if l.startswith("Error:")]
  assert errors == ["Error:0.496410031903", "Error:0.00858452565325", "Error:0.00578945986251",
                    "Error:0.00462917677677", "Error:0.00395876528027", "Error:0.00351012256786"]
