"""Trains the same tiny run on 1 and on 8 simulated CPU devices; prints JSON.

Run by tests/test_parallel.py in a subprocess, because the device count is
fixed when JAX starts: python tests/parallel_driver.py WORKDIR
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jdl import cli, train  # noqa: E402
from jdl.config import TrainConfig  # noqa: E402
from jdl.data import load_dataset  # noqa: E402
from jdl.errors import ConfigError  # noqa: E402
from jdl.models import ResNet  # noqa: E402


def main(workdir, augment=False):
  cli.enable_compilation_cache()  # $JDL_CACHE_DIR, set by tests/conftest.py
  data = load_dataset("shapes", num_train=160, num_test=40, seed=0)
  # BatchNorm, so the 8-device run must also reduce batch statistics over devices.
  model = ResNet(stage_sizes=(1, 1), widths=(4, 8), num_classes=10)
  states, report = {}, {"device_count": jax.device_count()}
  for name, devices in (("one", jax.devices()[:1]), ("eight", None)):
    config = TrainConfig(dataset="shapes", model="resnet20", epochs=2, batch_size=16,
                         validation_fraction=0.2, log_every=1000, augment=augment,
                         workdir=os.path.join(workdir, name))
    states[name], results = train.fit(config, data, model=model, devices=devices,
                                      progress=False, log=lambda line: None)
    report[f"{name}_test_accuracy"] = results["test_accuracy"]
  one, eight = states["one"], states["eight"]
  report["devices_of_params"] = len(jax.tree.leaves(eight.params)[0].sharding.device_set)
  report["max_abs_diff"] = max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
      for a, b in zip(jax.tree.leaves((one.params, one.batch_stats)),
                      jax.tree.leaves((eight.params, eight.batch_stats))))
  report["max_abs_param"] = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(one.params))
  try:
    train.fit(TrainConfig(dataset="shapes", model="resnet20", batch_size=12,
                          workdir=os.path.join(workdir, "bad")), data, model=model, progress=False)
  except ConfigError as e:
    report["uneven_batch_error"] = str(e)
  print(json.dumps(report))


if __name__ == "__main__":
  main(sys.argv[1], augment="--augment" in sys.argv[2:])
