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


def test_gan_sequence_and_seeds_tasks_use_all_devices_and_train_like_one(tmp_path):
  import numpy as np
  out = subprocess.run([sys.executable, "tests/parallel_loops_driver.py", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["device_count"] == 8
  # Under an 8-device mesh every recurrent layer (2 layers x 2 directions)
  # runs its loop split over the devices (4 shard_maps forward, 4 transposed),
  # with the outputs and all gradients of the unsplit layer.
  for name, run in report["recurrences"].items():
    assert run["split_loops"] == [0, 8], (name, run)
    assert run["max_abs_diff"] <= 1e-6 * run["max_abs"], (name, run)
  # Per loop: the arrays each traced step splits over the 8 devices (batch first).
  batches = {"gan": [[32, 32, 32, 3], [32]],  # images, labels
             # train.fit: MNIST-1D sequences and labels; eval batches (40 test
             # sequences: inputs, labels, mask) too.
             "sequence": [[16, 40, 1], [16], [40, 40, 1], [40]]}
  for loop, shapes in batches.items():
    run = report[loop]
    assert run["eight_said_parallel"] and not run["one_said_parallel"], loop
    assert run["one_sharded"] == [], loop
    assert run["eight_sharded"] and {(tuple(s), n) for s, n in run["eight_sharded"]} == {
        (tuple(s), 8) for s in shapes}, (loop, run["eight_sharded"])
    assert "batch_size 12 does not split evenly over 8 devices" in run["uneven_batch_error"], loop
    # The LSTM loops trace their steps under the 8-device mesh, so the layers
    # run their recurrences split over the devices: (batch, devices) of the
    # training steps, and of train.fit's evaluation batches of 40.
    split = {(b, n) for b, n in run["eight_recurrent_splits"]}
    assert {n for _, n in run["one_recurrent_splits"]} <= {1}, (loop, run)
    expected = {"sequence": {(16, 8), (40, 8)}}.get(loop, set())
    assert expected <= split and (expected or not split), (loop, split)
    # Every logged metric (losses, gradient norms, D outputs, Fréchet distance,
    # bits/char, MSEs) as on one device, up to float summation order.
    assert len(run["one"]) == len(run["eight"]) > 0, loop
    for one, eight in zip(run["one"], run["eight"]):
      keys = [k for k, v in one.items()
              if isinstance(v, float) and "time" not in k and not k.endswith("per_s")]
      assert keys, loop
      for key in keys:
        np.testing.assert_allclose(eight[key], one[key], rtol=1e-5, err_msg=f"{loop} {key}")

  # --num_seeds=4: one replica on each of 4 of the 8 devices, each replica the
  # run it is on one device (the replicas never exchange a value).
  seeds = report["seeds"]
  assert seeds["one_devices_of_params"] == 1 and seeds["eight_devices_of_params"] == 4
  # The most devices that share the replicas evenly.
  assert seeds["mesh_sizes"] == {"4 on 8": 4, "6 on 4": 3, "5 on 2": 1, "16 on 8": 8, "3 on 8": 3,
                                 "1 on 8": 1}
  assert seeds["eight_log"].endswith("1 on each of 4 devices"), seeds["eight_log"]
  np.testing.assert_allclose(seeds["eight_test"], seeds["one_test"], rtol=1e-5)
  assert len(seeds["one"]) == len(seeds["eight"]) == 2
  for one, eight in zip(seeds["one"], seeds["eight"]):
    for key in [k for k, v in one.items() if isinstance(v, float) and not k.endswith(("time_s", "per_s"))]:
      np.testing.assert_allclose(eight[key], one[key], rtol=1e-5, atol=1e-7, err_msg=f"seeds {key}")


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes_and_one(tmp_path, args, x, rows_at, keys):
  """Runs `python *args` as two processes of one device each (jax.distributed
  on localhost, a shared workdir) and as one process with two simulated
  devices; returns (shared workdir, single workdir).

  Checks that process 0 said it was data parallel and that the shared
  metrics.jsonl holds each row once (its `x` values are `rows_at`), with one
  TensorBoard file, and the `keys` of the single run's rows (rtol 1e-5)."""
  import numpy as np
  from jdl.logs import read_jsonl
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
  single = tmp_path / "single"
  ran = subprocess.run([sys.executable, *args, f"--workdir={single}"], cwd=ROOT,
                       env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
                       capture_output=True, text=True, timeout=300)
  assert ran.returncode == 0, ran.stderr[-3000:]
  rows, want = read_jsonl(shared / "metrics.jsonl"), read_jsonl(single / "metrics.jsonl")
  assert [r[x] for r in rows] == rows_at  # once each, not once per process
  assert len(list((shared / "tb").iterdir())) == 1
  for got, ref in zip(rows, want):
    for key in keys:
      np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, err_msg=key)
  return shared, single


def test_two_processes_train_like_one_process_with_two_devices(tmp_path):
  """Multi-host through jax.distributed on one machine: two processes of one
  device each, a shared workdir. They train as one process with two devices
  does, and the run's files hold each row once (process 0 writes them)."""
  shared, single = _two_processes_and_one(tmp_path, [
      "-m", "experiments.cifar", "--dataset=shapes", "--num_train=256", "--num_test=64",
      "--epochs=2", "--batch_size=32", "--model=mlp"], x="epoch", rows_at=[1, 2],
      keys=("train_loss", "train_accuracy", "val_loss", "val_accuracy", "train_grad_norm"))
  results = json.loads((shared / "results.json").read_text())
  assert results["test_loss"] == pytest.approx(
      json.loads((single / "results.json").read_text())["test_loss"], rel=1e-5)


def test_text_loop_on_two_processes_trains_like_two_devices(tmp_path):
  """The character LSTM's own loop (not jdl.train.fit) across two processes."""
  rhyme = tmp_path / "rhyme.txt"
  rhyme.write_text("the cat sat on the mat; the dog sat on the log.\n" * 40, encoding="utf-8")
  shared, single = _two_processes_and_one(tmp_path, [
      "-m", "experiments.text", f"--text_file={rhyme}", "--embed_dim=8", "--hidden_size=16",
      "--num_layers=1", "--dropout=0", "--seq_len=16", "--batch_size=8", "--steps=6",
      "--eval_every=3", "--sample_length=20", "--log_every=2"],
      x="step", rows_at=[3, 6], keys=("train_bpc", "val_bpc"))
  assert (shared / "samples.txt").read_text() == (single / "samples.txt").read_text()


@pytest.mark.parametrize("model,batch,cores,implementation,expected", [
    ("lstm", 64, 2, None, 2),    # 32 per device: the benchmark's lstm
    ("lstm", 32, 2, None, 1),    # 16 per device would not gain (text's default batch)
    ("gru", 100, 8, None, 2),    # 3 and more would leave fewer than 32 or not divide 100
    ("rnn", 96, 4, "scan", 3),
    ("lstm", 64, 2, "cudnn", 1),  # a GPU kernel: the CPU's devices do not matter
    ("cnn", 128, 2, None, 1),    # convolutions use every core inside one device
])
def test_auto_cpu_devices(model, batch, cores, implementation, expected):
  from jdl import parallel
  assert parallel.auto_cpu_devices(model, batch, implementation, cores=cores) == expected


def test_cpu_devices_flag_default_is_the_entrypoints_choice(monkeypatch):
  """cli.call: --cpu_devices wins; left unset, the entrypoint's auto count
  (none: 1); where JAX already started in-process, an auto count keeps the
  devices there and an explicit one is the one-line error."""
  from absl import flags
  from jdl import cli, parallel
  from jdl.errors import ConfigError
  cli.define_common_flags()
  calls = []

  def set_cpu_devices(count):
    calls.append(count)
    if count == 3:
      raise ConfigError("cpu_devices must be set before JAX starts its CPU backend")
  monkeypatch.setattr(parallel, "set_cpu_devices", set_cpu_devices)
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  ran = []

  def call(argv, auto=None):
    flags.FLAGS.unparse_flags()
    try:
      cli.call(lambda _: ran.append(True), cli.parse_flags(argv), auto_cpu_devices=auto)
    finally:
      flags.FLAGS.unparse_flags()

  call(["prog"], auto=lambda: 2)
  call(["prog", "--cpu_devices=4"], auto=lambda: 2)
  call(["prog"])
  call(["prog", "--cpu_devices=1"], auto=lambda: 2)
  call(["prog"], auto=lambda: 3)  # JAX started: runs on what it has
  assert calls == [2, 4, 3] and len(ran) == 5
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  call(["prog"], auto=lambda: 2)
  assert calls == [2, 4, 3] and len(ran) == 6
  with pytest.raises(SystemExit) as exit_info:
    call(["prog", "--cpu_devices=3"])
  assert exit_info.value.code == 2 and calls[-1] == 3 and len(ran) == 6


@pytest.mark.parametrize("module,flag_sets", [
    ("benchmark", [["--model=lstm", "--batch_size=64"], ["--model=cnn", "--batch_size=64"]]),
    ("sequence", [[], ["--model=cnn1d"]]),  # its default: gru, batch 100
    ("text", [["--batch_size=64"], []]),   # its default batch 32: one device
])
def test_entrypoints_choose_cpu_devices_for_recurrent_models(module, flag_sets):
  """Each entrypoint's `cpu_devices` (cli.run's default for --cpu_devices),
  read from its own parsed flags in a fresh process."""
  from jdl import parallel
  script = (f"import sys; from absl import flags; from experiments import {module}\n"
            "for argv in sys.argv[1:]:\n"
            "  flags.FLAGS.unparse_flags(); flags.FLAGS(['prog', *argv.split()])\n"
            f"  print({module}.cpu_devices())\n")
  out = subprocess.run([sys.executable, "-c", script, *(" ".join(f) for f in flag_sets)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  expected = {"benchmark": [parallel.auto_cpu_devices("lstm", 64), 1],
              "sequence": [parallel.auto_cpu_devices("gru", 100), 1],
              "text": [parallel.auto_cpu_devices("lstm", 64), 1]}[module]
  assert [int(line) for line in out.stdout.split()] == expected
