"""Data parallel: 8 simulated CPU devices train like 1 device."""
import json
import os
import subprocess
import sys

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
