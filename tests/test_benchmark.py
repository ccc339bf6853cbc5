"""experiments.benchmark: figures present and plausible, errors, the PyTorch side where installed."""
import json
import os
import subprocess
import sys
import time

import jax
import pytest

from jdl import benchmark
from jdl.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_peak_table():
  assert benchmark.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert benchmark.peak_flops("NVIDIA H200", "bfloat16") == 989e12
  assert benchmark.peak_flops("NVIDIA A100-SXM4-40GB", "bfloat16") == 312e12
  assert benchmark.peak_flops("cpu", "float32") is None


def test_logistic_figures_are_plausible():
  batch, features, classes = 16, 32 * 32 * 3, 10
  result = benchmark.benchmark("logistic", batch_size=batch, steps=3, warmup=1)
  assert result["params"] == features * classes + classes
  assert result["compile_s"] > 0 and result["step_ms"] > 0
  assert result["step_ms_p10"] <= result["step_ms"] <= result["step_ms_p90"]
  assert result["examples_per_s"] == pytest.approx(batch / result["step_ms"] * 1e3)
  # Forward matmul 2*B*D*C FLOPs; backward adds the kernel gradient (the same
  # again; no input gradient is needed); the rest (softmax, Adam) is small.
  matmul = 2 * batch * features * classes
  assert 2 * matmul <= result["flops_per_step"] <= 4 * matmul
  assert result["matmul_flops_per_step"] == 2 * matmul
  assert result["mfu"] is None  # CPU peak unknown
  scanned = benchmark.benchmark("logistic", batch_size=batch, steps=2, warmup=1, steps_per_call=3)
  assert scanned["flops_per_step"] == pytest.approx(result["flops_per_step"], rel=0.05)
  assert scanned["matmul_flops_per_step"] == 2 * matmul  # the scan's 3 steps, per step


def test_matmul_flops_against_hand_counts():
  """`matmul_flops` counts 2 FLOPs per multiply-add of each dot and
  convolution, a scan's body once per step, a shard_map's body once per
  device, a cond's costlier branch; elementwise work not at all."""
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  count = lambda fn, *args: benchmark.matmul_flops(jax.make_jaxpr(fn)(*args))
  a, w = jnp.ones((8, 16)), jnp.ones((16, 4))
  dot = 2 * 8 * 16 * 4
  assert count(lambda a, w: jnp.tanh(a @ w) + 1.0, a, w) == dot
  recurrent = jnp.ones((16, 16))
  steps = lambda a, r: jax.lax.scan(lambda h, _: (jnp.tanh(h @ r), None), a, None, length=5)[0]
  assert count(steps, a, recurrent) == 5 * 2 * 8 * 16 * 16
  branches = lambda a, w: jax.lax.cond(a[0, 0] > 0, lambda: a @ w, lambda: a[:, :4] @ w[:4])
  assert count(branches, a, w) == dot  # not dot + 2 * 8 * 4 * 4
  mesh = jax.sharding.AbstractMesh((4,), ("data",))
  split = jax.shard_map(lambda a, w: a @ w, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"))
  assert count(split, a, w) == dot  # 4 devices x a (2, 16) @ (16, 4) each
  # A 2x2 stride-2 convolution, 3 -> 5 channels on (2, 8, 8, 3): 2 * 2*4*4*5
  # outputs * 2*2*3 taps. Its gradient: the kernel gradient and the input
  # gradient (a convolution of the 2-dilated output gradient, where 3 of 4
  # taps meet zeros) each do the forward's multiply-adds again.
  x, kernel = jnp.ones((2, 8, 8, 3)), jnp.ones((2, 2, 3, 5))
  conv = lambda x, kernel: jax.lax.conv_general_dilated(
      x, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  forward = 2 * (2 * 4 * 4 * 5) * (2 * 2 * 3)
  assert count(conv, x, kernel) == forward
  assert count(jax.grad(lambda x, k: conv(x, k).sum(), argnums=(0, 1)), x, kernel) == 3 * forward


def test_cudnn_lstm_flops_equal_the_scans():
  """The cuDNN LSTM is one kernel call, so its FLOPs come from its parameters;
  they must equal the dots of the scan implementation of the same LSTM (2
  layers, both directions), forward, and twice that backward. The kernel only
  runs on a GPU, so its two equations are stood in for here."""
  import types
  import jax.numpy as jnp
  from jdl.models.rnn import RNN
  batch, steps, features, hidden = 3, 7, 5, 8
  model = RNN(cell="lstm", hidden_size=hidden, num_layers=2, bidirectional=True)
  x = jnp.ones((batch, steps, features))
  params = model.init(jax.random.key(0), x)["params"]
  scan = benchmark.matmul_flops(jax.make_jaxpr(lambda p: model.apply({"params": p}, x))(params))

  def cudnn_call(name, first_input_shape):
    shaped = types.SimpleNamespace(aval=types.SimpleNamespace(shape=first_input_shape))
    return types.SimpleNamespace(
        primitive=types.SimpleNamespace(name=name), invars=[shaped], outvars=[], params=dict(
            input_size=features, hidden_size=hidden, num_layers=2, bidirectional=True))
  forward = benchmark.matmul_flops(types.SimpleNamespace(eqns=[cudnn_call("rnn_fwd", x.shape)]))
  backward = benchmark.matmul_flops(types.SimpleNamespace(
      eqns=[cudnn_call("rnn_bwd", (batch, steps, 2 * hidden))]))
  assert forward == scan and backward == 2 * scan


def test_bad_benchmark_input():
  with pytest.raises(ConfigError, match="unknown model 'resnet99'"):
    benchmark.benchmark("resnet99")
  with pytest.raises(ConfigError, match="precision must be"):
    benchmark.benchmark("cnn", precision="float16")
  with pytest.raises(ConfigError, match="steps_per_call must be >= 1"):
    benchmark.benchmark("cnn", steps_per_call=0)
  with pytest.raises(ConfigError, match="does not apply to model 'cnn'"):
    benchmark.benchmark("cnn", rnn_implementation="cudnn")
  with pytest.raises(ConfigError, match="runs only the lstm cell, not 'gru'"):
    benchmark.benchmark("gru", rnn_implementation="cudnn")
  if jax.default_backend() != "gpu":
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
      benchmark.benchmark("lstm", rnn_implementation="cudnn")


def test_benchmark_entrypoint_json():
  result = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--model=logistic",
                           "--batch_size=8", "--steps=2", "--warmup=1", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  row = json.loads(result.stdout.strip().splitlines()[-1])
  for key in ("model", "batch_size", "precision", "device_kind", "compile_s", "step_ms",
              "examples_per_s", "flops_per_step", "matmul_flops_per_step", "mfu"):
    assert key in row, key
  assert row["data_parallel_devices"] == 1
  # What the step was compiled with: the entrypoint enables jdl's CPU options
  # (kernels are on by default), whatever this test process has enabled.
  from jdl import xla
  was = xla._ENABLED
  try:
    xla.enable(True)
    expected = xla.compiler_options()
  finally:
    xla.enable(was)
  assert row["xla_options"] == expected


def test_benchmark_on_two_cpu_devices():
  """--cpu_devices=2: the CPU as two devices, the step data parallel over
  them. flops_per_step counts the whole step (XLA reports one device's
  share); at batch 256 the work each device repeats (the optimizer update of
  30,730 parameters) is ~1% of it."""
  rows = []
  for devices in (1, 2):
    out = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--model=logistic",
                          "--batch_size=256", "--steps=2", "--warmup=1", "--json",
                          f"--cpu_devices={devices}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  assert rows[1]["device_count"] == rows[1]["data_parallel_devices"] == 2
  assert rows[1]["flops_per_step"] == pytest.approx(rows[0]["flops_per_step"], rel=0.03)
  for flags, message in ((["--cpu_devices=0"], "error: cpu_devices must be >= 1, got 0"),
                         (["--cpu_devices=2", "--batch_size=3"],
                          "error: batch_size 3 does not split evenly over 2 devices")):
    bad = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--model=logistic",
                          "--steps=1", *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(message), bad.stderr


@pytest.mark.parametrize("model,batch", [("lstm", 8), ("cnn", 8)])
def test_compare_torch(model, batch):
  pytest.importorskip("torch")
  result = benchmark.compare_torch(model, batch_size=batch, steps=2, warmup=1)
  torch_side = result["torch"]
  assert torch_side["framework"] == "torch" and torch_side["params"] == result["params"]
  assert torch_side["step_ms"] > 0 and result["step_ms"] > 0
  assert result["ratio_vs_torch"] == pytest.approx(
      result["examples_per_s"] / torch_side["examples_per_s"])


def test_torch_side_with_a_non_finite_loss_is_an_error(monkeypatch):
  torch = pytest.importorskip("torch")
  from jdl import torch_reference
  build = torch_reference.build

  def nan_build(*args, **kwargs):
    step = build(*args, **kwargs)

    def nan_step():
      step()
      step.losses["loss"] = torch.tensor(float("nan"))
    nan_step.losses = step.losses
    return nan_step
  monkeypatch.setattr(torch_reference, "build", nan_build)
  with pytest.raises(ConfigError, match="PyTorch cnn produced a non-finite loss"):
    benchmark.compare_torch("cnn", batch_size=4, steps=1, warmup=0)


def test_sides_are_timed_alternately_in_blocks():
  calls = []

  def side(name):
    def run():
      calls.append(name)
      return 0.001 if name == "a" else 0.002
    return benchmark._Side(run, lambda times: {"times": times}, params=0)

  results = benchmark._time_sides({"a": side("a"), "b": side("b")}, steps=12, warmup=2, block=5)
  # Warm-up, then blocks of 5 timed calls, each after one untimed call.
  assert calls == ["a"] * 2 + ["b"] * 2 + (["a"] * 6 + ["b"] * 6) * 2 + ["a"] * 3 + ["b"] * 3
  assert results["a"]["times"] == [0.001] * 12 and results["b"]["times"] == [0.002] * 12
  assert set(results["a"]["host"]) == {"load_before", "other_cores", "quiet"}
  calls.clear()  # one side alone: nothing to settle
  results = benchmark._time_sides({"a": side("a")}, steps=7, warmup=1, block=5)
  assert calls == ["a"] * 8 and results["a"]["times"] == [0.001] * 7


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_host_load_sees_another_busy_process():
  """Another process spinning while we time shows as ~1 core of other work, so
  the figures are flagged (the other test worker can only add to it)."""
  spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.5\n"
                              "while time.time() < end: pass"])
  try:
    time.sleep(0.2)  # let it start spinning
    with benchmark.HostLoad() as load:
      time.sleep(1.0)  # this process idles: its own CPU time is not counted
  finally:
    spinner.wait()
  report = load.report()
  assert report["other_cores"] > 0.6 and not report["quiet"], report


MALLOC_PROBE = """
import resource, sys
import jax
from jdl import benchmark, cli, xla
from jdl.core import PRNG_IMPL
if sys.argv[1] == "tuned":
  assert cli.tune_malloc()
# The cnn step at batch 256: a 59 MiB temp buffer per call, over glibc's
# largest mmap threshold (32 MiB).
step, state, _, batch = benchmark._classifier_step("cnn", 256, "float32")
key = jax.random.key(0, impl=PRNG_IMPL)
step = xla.jit(step, donate_argnums=0).lower(state, key, batch).compile()
temp_mib = step.memory_analysis().temp_size_in_bytes / 2**20
for i in range(6):  # until the heap has grown to the step's peak
  state, loss = step(state, key, batch)
  jax.block_until_ready(loss)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(10):
  state, loss = step(state, key, batch)
  jax.block_until_ready(loss)
print(temp_mib, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_tune_malloc_stops_refaulting_the_temp_buffer():
  """Without it every step maps the cnn's 59 MiB temp buffer afresh (~15,000 faults)."""
  faults = {}
  for mode in ("default", "tuned"):
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE, mode], capture_output=True,
                         text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    temp_mib, faults[mode] = map(float, out.stdout.split()[-2:])
    assert temp_mib > 40, temp_mib  # the premise: well over glibc's 32 MiB mmap threshold
  assert faults["default"] > 0.8 * temp_mib * 256, faults  # 4 KiB pages of the buffer
  # Measured: 0-1,000 (the heap still grows now and then, by one temp buffer).
  assert faults["tuned"] < faults["default"] / 2, faults
