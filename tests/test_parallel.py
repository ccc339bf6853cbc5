"""Data parallel: 8 simulated CPU devices train like 1 device."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_eight_devices_reach_the_parameters_of_one(tmp_path):
  # With augmentation: the random crops/flips must not depend on the device count either.
  out = subprocess.run([sys.executable, "tests/parallel_driver.py", str(tmp_path), "--augment"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["device_count"] == 8
  assert report["devices_of_params"] == 8  # replicated over the mesh, not left on one device
  # 2 epochs x 8 steps of batch 16 (2 per device), BatchNorm over the whole batch:
  # the same updates up to float summation order.
  assert report["max_abs_diff"] < 1e-4 * max(1.0, report["max_abs_param"]), report
  assert abs(report["one_test_accuracy"] - report["eight_test_accuracy"]) <= 0.05
  assert "batch_size 12 does not split evenly over 8 devices" in report["uneven_batch_error"]


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one_process_with_two_devices(tmp_path):
  """Multi-host through jax.distributed on one machine: two processes of one
  device each, a shared workdir. They train as one process with two devices
  does, and the run's files hold each row once (process 0 writes them)."""
  import numpy as np
  from jdl.logs import read_jsonl
  args = ["-m", "experiments.cifar", "--dataset=shapes", "--num_train=256", "--num_test=64",
          "--epochs=2", "--batch_size=32", "--model=mlp"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  address = f"localhost:{_free_port()}"
  shared = tmp_path / "shared"
  procs = [subprocess.Popen([sys.executable, *args, f"--workdir={shared}",
                             f"--coordinator_address={address}", "--num_processes=2",
                             f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert "Data parallel over 2 devices" in outputs[0]
  single = subprocess.run([sys.executable, *args, f"--workdir={tmp_path / 'single'}"], cwd=ROOT,
                          env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
                          capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]

  rows, want = read_jsonl(shared / "metrics.jsonl"), read_jsonl(tmp_path / "single" / "metrics.jsonl")
  assert [r["epoch"] for r in rows] == [1, 2]  # once each, not once per process
  assert len(list((shared / "tb").iterdir())) == 1
  for got, ref in zip(rows, want):
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "train_grad_norm"):
      np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, err_msg=key)
  results = json.loads((shared / "results.json").read_text())
  assert results["test_loss"] == pytest.approx(
      json.loads((tmp_path / "single" / "results.json").read_text())["test_loss"], rel=1e-5)
