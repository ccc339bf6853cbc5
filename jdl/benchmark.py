"""Honest speed measurement of one jitted training step, and the PyTorch side.

    result = benchmark("cnn", batch_size=128, steps=50)
    print(result["step_ms"], result["examples_per_s"], result["mfu"])

What is measured and how:
  compile_s       `jit(...).lower(...).compile()` of the step, timed alone
                  (with the persistent compilation cache off, so it is cold).
  step_ms         median wall time of one training step (a call runs
                  `steps_per_call` steps in a `lax.scan`; its time is divided),
                  after `warmup` calls, each call synchronised with
                  `block_until_ready`; `step_ms_p10`/`p90` give the spread.
  flops_per_step  XLA's cost analysis of the compiled step (per step); data
                  parallel: one device's share times the device count, so
                  work every device repeats (the optimizer update) counts
                  once per device.
  matmul_flops_per_step  the FLOPs of every dot and convolution in the step's
                  jaxpr, a scan's body counted once per iteration
                  (`matmul_flops`). XLA's cost analysis counts a loop body
                  once: the lstm's 0.53 GFLOP there is 1.26 GFLOP of matmuls.
  mfu             the larger of the two counts (each a lower bound of the
                  work: XLA's misses loop iterations, the matmul count
                  elementwise work) / step time / (the device's dense peak
                  (`PEAK_FLOPS`) x devices); None where the peak is unknown (CPUs).
  peak_memory_bytes  `device.memory_stats()['peak_bytes_in_use']` where the
                  backend reports it (GPU, TPU), else None.
Data is synthetic (fixed random arrays of the right shape, already on the
device): the benchmark times the step, not an input pipeline.
With several local devices (GPUs, or `--cpu_devices=N` on a CPU host) the
step is data parallel over them, as in the training loops: the batch split,
the state replicated; `data_parallel_devices` says how many. For recurrent
models, experiments.benchmark makes a CPU host one device per core by
default, as experiments.sequence and text do (`parallel.auto_cpu_devices`).

`compare_torch` times jdl's step and the same step in PyTorch in one loop,
alternating every 5 steps, so that a shared host whose speed drifts within a
minute moves both sides alike; timing one side after the other would move
the ratio by as much as the host drifts.
  host            how busy the host was with other work while timing
                  (`HostLoad`): the 1-minute load average before, and the
                  cores other processes used on average during the timing;
                  `quiet` is False above `BUSY_HOST_CORES`, and then the
                  figures (and above all a ratio between two thread pools)
                  cannot be trusted.
"""
import functools
import os
import statistics
import time
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jdl import gan, ops, optim, parallel, xla
from jdl.errors import ConfigError
from jdl.models import MODELS, build_model
from jdl.summary import count_params
from jdl.core import PRNG_IMPL, TrainState
from jdl.train import train_step

# Dense peak FLOP/s by device-kind substring and compute precision (vendor
# datasheets, SXM parts, without sparsity). float32 means plain FP32 units
# (XLA may use TF32 on Ampere+ for float32 matmuls; this table does not
# credit that). Matched in order, first hit wins.
PEAK_FLOPS = [
    ("H200", {"bfloat16": 989e12, "float32": 67e12}),
    ("H100", {"bfloat16": 989e12, "float32": 67e12}),
    ("A100", {"bfloat16": 312e12, "float32": 19.5e12}),
    ("L4", {"bfloat16": 121e12, "float32": 30.3e12}),
    ("V100", {"bfloat16": None, "float32": 15.7e12}),
    ("TPU v5p", {"bfloat16": 459e12, "float32": None}),
    ("TPU v5 lite", {"bfloat16": 197e12, "float32": None}),
    ("TPU v4", {"bfloat16": 275e12, "float32": None}),
]

# The benchmark's models: registry classifiers plus 'dcgan' (a GAN step).
# Per model: example shape without the batch axis, and the optimizer the
# course notes' version trains it with.
SEQUENCE_SHAPE = (40, 32)  # LSTM benchmark: length 40, 32 features
DEFAULTS = {
    "cnn": dict(shape=(32, 32, 3), optimizer="rmsprop", learning_rate=1e-3),
    "lstm": dict(shape=SEQUENCE_SHAPE, optimizer="adam", learning_rate=1e-3),
    "gru": dict(shape=SEQUENCE_SHAPE, optimizer="adam", learning_rate=1e-3),
    "rnn": dict(shape=SEQUENCE_SHAPE, optimizer="adam", learning_rate=1e-3),
    "cnn1d": dict(shape=(40, 1), optimizer="adam", learning_rate=1e-3),
}
IMAGE_DEFAULT = dict(shape=(32, 32, 3), optimizer="momentum", learning_rate=0.1)


def peak_flops(device_kind: str, precision: str) -> Optional[float]:
  """Dense peak FLOP/s of a device kind at `precision`, None if unknown."""
  for key, peaks in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return peaks.get(precision)
  return None


def _sub_jaxprs(value):
  """The jaxprs held by one equation parameter (a jaxpr, a closed jaxpr or a tuple of them)."""
  for item in value if isinstance(value, (tuple, list)) else (value,):
    if hasattr(item, "eqns"):
      yield item
    elif hasattr(getattr(item, "jaxpr", None), "eqns"):
      yield item.jaxpr


def _cudnn_lstm_flops(eqn) -> float:
  """The matmul FLOPs of one cuDNN LSTM call: per layer and direction, T steps of
  (B, F + H) @ (F + H, 4H); the backward (input and weight gradients) twice that."""
  batch, steps = eqn.invars[0].aval.shape[:2]  # x (forward) or dy (backward): (B, T, ...)
  params = eqn.params
  hidden, directions = params["hidden_size"], 2 if params["bidirectional"] else 1
  width, forward = params["input_size"], 0.0
  for _ in range(params["num_layers"]):
    forward += directions * 2.0 * steps * batch * 4 * hidden * (width + hidden)
    width = directions * hidden  # the next layer's input
  return forward if eqn.primitive.name == "rnn_fwd" else 2.0 * forward


def matmul_flops(jaxpr) -> float:
  """FLOPs of every dot_general and convolution in a (closed) jaxpr, 2 per multiply-add.

  A scan's body counts `length` times and a shard_map's body once per device
  of its manual axes; a cond counts its costliest branch and a while loop
  (trip count unknown) its body once; a cuDNN LSTM call counts its matmuls.
  Elementwise work is not counted. XLA's cost
  analysis, by contrast, counts every loop body once: for the benchmark's
  lstm (T = 40) that misses about half of the step's work.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      out_size = float(np.prod(eqn.outvars[0].aval.shape))
      total += 2.0 * out_size * float(np.prod([lhs_shape[d] for d in lhs_contract]))
    elif name in ("rnn_fwd", "rnn_bwd"):  # the cuDNN LSTM (jax.experimental.rnn), one kernel
      total += _cudnn_lstm_flops(eqn)
    elif name == "conv_general_dilated":
      out_size = float(np.prod(eqn.outvars[0].aval.shape))
      rhs_shape = eqn.invars[1].aval.shape
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
      per_output = rhs_shape[rhs_spec[1]] * np.prod([rhs_shape[d] for d in rhs_spec[2:]])
      # An input dilated by s (the gradient of a stride-s convolution) puts a
      # real value under 1 in prod(s) of the taps: the others multiply zeros.
      per_output /= np.prod(eqn.params["lhs_dilation"])
      total += 2.0 * out_size * float(per_output)
    else:
      inner = [matmul_flops(sub) for value in eqn.params.values() for sub in _sub_jaxprs(value)]
      if not inner:
        continue
      if name == "scan":
        total += eqn.params["length"] * sum(inner)
      elif name == "shard_map":  # the body's shapes are one device's share along its manual axes
        mesh = eqn.params["mesh"]
        axes = eqn.params.get("newly_manual_axes") or mesh.axis_names
        total += float(np.prod([mesh.shape[axis] for axis in axes])) * sum(inner)
      elif name == "cond":
        total += max(inner)
      else:
        total += sum(inner)
  return total


def model_names():
  return sorted(MODELS.names()) + ["dcgan"]


def _classifier_step(name: str, batch_size: int, precision: str, seed: int = 0,
                     rnn_implementation: Optional[str] = None):
  """(jittable fn(state, key, batch) -> (state, loss), state, parameter count,
  batch) for a classifier; batch = (inputs (B, ...), labels (B,)), synthetic."""
  settings = DEFAULTS.get(name, IMAGE_DEFAULT)
  dtype = jnp.bfloat16 if precision == "bfloat16" else jnp.float32
  overrides = {"num_classes": 10, "dtype": dtype}
  if name in ("lstm", "gru", "rnn"):
    overrides["hidden_size"] = 128
  if rnn_implementation is not None:
    overrides["implementation"] = rnn_implementation
  model = build_model(name, **overrides)
  shape = settings["shape"]
  tx = optim.make_optimizer(settings["optimizer"], settings["learning_rate"])
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(batch_size, *shape)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(seed, impl=PRNG_IMPL), images[:1])
  state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                            batch_stats=variables.get("batch_stats"))

  def step(state, key, batch):
    state, metrics = train_step(state, batch, key)
    return state, metrics["loss"]
  return step, state, count_params(variables["params"]), (images, labels)


def _dcgan_step(batch_size: int, precision: str, seed: int = 0):
  """The experiments.gan step (D then G) at its default sizes on 32x32x3, as
  `_classifier_step`; the batch is the real images (B, 32, 32, 3)."""
  from jdl.models.decoder import Discriminator, Generator
  config = gan.GANConfig()
  dtype = jnp.bfloat16 if precision == "bfloat16" else jnp.float32
  generator = Generator((32, 32, 3), config.g_width, dtype=dtype, **ops.choices(Generator))
  discriminator = Discriminator(config.d_width, dtype=dtype, **ops.choices(Discriminator))
  state = gan.create_gan_state(generator, discriminator, (32, 32, 3), config.latent_dim,
                               jax.random.key(seed, impl=PRNG_IMPL))
  images = jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (batch_size, 32, 32, 3)),
                       jnp.float32)

  def step(state, key, real):
    state, metrics = gan.gan_train_step(state, real, None, key, config.real_label)
    return state, metrics["d_loss"]
  params = count_params(state.g.params) + count_params(state.d.params)
  return step, state, params, images


class _Side:
  """One framework's compiled step, ready to time: `run()` does one call and
  returns its wall seconds per training step; `result(times)` the figures;
  `params` the parameter count."""

  def __init__(self, run: Callable[[], float], result: Callable[[list], Dict], params: int):
    self.run, self.result, self.params = run, result, params


def _timing(times, batch_size: int) -> Dict:
  """Median, p10 and p90 step time (ms) and examples/s of per-step `times` (s)."""
  step_s = statistics.median(times)
  return {"step_ms": 1e3 * step_s,
          "step_ms_p10": 1e3 * float(np.percentile(times, 10)),
          "step_ms_p90": 1e3 * float(np.percentile(times, 90)),
          "examples_per_s": batch_size / step_s}


# Other processes using more than this many cores on average while timing make
# the figures untrustworthy: both sides' thread pools spin and fight them for the
# cores, and PyTorch's barrier after every op can slow its step many times over
# (BUILD_NOTES.md).
BUSY_HOST_CORES = 0.25


def _host_cpu_seconds() -> Optional[float]:
  """CPU seconds all processes of this host have used (Linux /proc/stat), None elsewhere."""
  try:
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:8]]  # user nice system idle iowait irq softirq
  except (OSError, ValueError):
    return None
  user, nice, system, _, _, irq, softirq = fields
  return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class HostLoad:
  """How busy the host is with work other than this process, around a timing.

      with HostLoad() as load:
        ...  # timed work
      load.report()  # {'load_before', 'other_cores', 'quiet'}
  `other_cores`: the host's CPU time minus this process's, over the wall time
  (0 on an idle host, 1 with one other busy thread); None off Linux.
  """

  def __enter__(self):
    self.load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    self.start = (time.perf_counter(), _host_cpu_seconds(), sum(os.times()[:2]))
    return self

  def __exit__(self, *exc):
    self.end = (time.perf_counter(), _host_cpu_seconds(), sum(os.times()[:2]))
    return False

  def report(self) -> Dict:
    (t0, host0, own0), (t1, host1, own1) = self.start, self.end
    other = None
    if host0 is not None and host1 is not None and t1 > t0:
      other = max((host1 - host0) - (own1 - own0), 0.0) / (t1 - t0)
    return {"load_before": self.load_before, "other_cores": other,
            "quiet": other is None or other <= BUSY_HOST_CORES}


def _time_sides(sides: Dict[str, _Side], steps: int, warmup: int, block: int = 5) -> Dict[str, Dict]:
  """Times every side `steps` times after `warmup` calls, alternating between
  sides every `block` calls, so that a host that speeds up or slows down
  during the run (common on shared machines) moves every side alike.

  With two sides, each block starts with one untimed call: the first call
  after the other side's block shares the cores with that side's threads
  still spinning (PyTorch's OpenMP pool spins for milliseconds after its
  last op). Without it, the first call of each block ran slower than the
  other four, on both sides (BUILD_NOTES.md): an artefact of running both in
  one process, not a cost of either."""
  for side in sides.values():
    for _ in range(warmup):
      side.run()
  times = {name: [] for name in sides}
  with HostLoad() as load:
    while any(len(t) < steps for t in times.values()):
      for name, side in sides.items():
        count = min(block, steps - len(times[name]))
        if count and len(sides) > 1:
          side.run()  # untimed: see above
        for _ in range(count):
          times[name].append(side.run())
  return {name: {**side.result(times[name]), "host": load.report()} for name, side in sides.items()}


def _jdl_side(model: str, *, batch_size: int, precision: str, steps_per_call: int, seed: int,
              rnn_implementation: Optional[str], replicas: int = 1) -> _Side:
  if model not in model_names():
    raise ConfigError(f"unknown model {model!r}; choose one of: {', '.join(model_names())}")
  if precision not in ("float32", "bfloat16"):
    raise ConfigError(f"precision must be float32 or bfloat16, got {precision!r}")
  for name, value in (("batch_size", batch_size), ("steps_per_call", steps_per_call)):
    if value < 1:
      raise ConfigError(f"{name} must be >= 1, got {value}")
  if rnn_implementation is not None:
    if model not in ("lstm", "gru", "rnn"):
      raise ConfigError(f"rnn_implementation does not apply to model {model!r} (it is not recurrent)")
    from jdl.models import rnn
    rnn.check_implementation(rnn_implementation, model, jnp.dtype(precision), backend=True)
  # Data parallel over the local devices when there are several, as the
  # training loops are (on a CPU host: --cpu_devices).
  mesh = parallel.data_mesh(jax.local_devices())
  parallel.check_batch_size(batch_size, mesh)
  if model == "dcgan":
    step, state, num_params, batch = _dcgan_step(batch_size, precision, seed)
  else:
    step, state, num_params, batch = _classifier_step(model, batch_size, precision, seed,
                                                      rnn_implementation)
  if replicas > 1:  # the --num_seeds step: N stacked states, one vmapped step, the batch shared
    state = jax.tree.map(lambda a: jnp.stack([a] * replicas), state)
    num_params *= replicas
    one_step = step
    step = lambda state, key, batch: jax.vmap(one_step, in_axes=(0, 0, None))(
        state, jax.random.split(key, replicas), batch)
  # The batch is an argument, split over the devices (a constant batch with a
  # sharding constraint made the 2-device lstm step slower).
  state, batch = parallel.replicate(state, mesh), jax.device_put(batch, parallel.shardings(mesh)[1])

  # K = 1: the step itself. K > 1: a scan, fully unrolled on CPU, where XLA
  # runs a step inside a while loop several times slower (BUILD_NOTES.md),
  # rolled on accelerators.
  unroll = True if jax.default_backend() == "cpu" else 1

  # The next call's key comes out of this one, as a training loop derives its
  # step keys on the device: no host-side key op between steps (replacing an
  # eager fold_in per call made no measurable difference; BUILD_NOTES.md).
  def call(state, key, batch):
    key, step_key = jax.random.split(key)
    if steps_per_call == 1:
      state, loss = step(state, step_key, batch)
      return state, loss, key
    keys = jax.random.split(step_key, steps_per_call)
    state, losses = jax.lax.scan(lambda state, key: step(state, key, batch), state, keys,
                                 unroll=unroll)
    return state, losses[-1], key

  key = parallel.replicate(jax.random.key(seed + 1, impl=PRNG_IMPL), mesh)
  jitted = xla.jit(call, donate_argnums=(0, 1))
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)  # a cold compile, honestly
  try:
    start = time.perf_counter()
    traced = parallel.within(mesh, lambda: jitted.trace(state, key, batch))()
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - start
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # XLA's cost analysis counts one device's share of a data-parallel step.
  devices = 1 if mesh is None else mesh.size
  flops = float(cost.get("flops", 0.0)) * devices / steps_per_call if cost else None
  # Dots and convolutions of the whole step, loops counted in full (a
  # shard_map's body once per device): what XLA's count misses in scans.
  counted = matmul_flops(traced.jaxpr) / steps_per_call  # the trace that was compiled
  mfu_flops = max(flops or 0.0, counted) or None

  carry = {"state": state, "key": key, "loss": None}

  def run() -> float:
    start = time.perf_counter()
    carry["state"], carry["loss"], carry["key"] = compiled(carry["state"], carry["key"], batch)
    jax.block_until_ready(carry["loss"])
    return (time.perf_counter() - start) / steps_per_call

  def result(times) -> Dict:
    if not np.isfinite(np.asarray(carry["loss"])).all():
      raise ConfigError(f"{model} produced a non-finite loss on synthetic data")
    timing = _timing(times, batch_size)
    step_s = timing["step_ms"] / 1e3
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind, precision)
    memory = None
    try:
      stats = device.memory_stats()
      memory = stats.get("peak_bytes_in_use") if stats else None
    except Exception:  # noqa: BLE001 -- backends without memory stats
      memory = None
    return {
        "framework": "jdl",
        "model": model,
        "rnn_implementation": rnn_implementation,
        "batch_size": batch_size,
        "precision": precision,
        "steps_per_call": steps_per_call,
        "params": num_params,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "data_parallel_devices": devices,
        "compile_s": compile_s,
        **timing,
        "flops_per_step": flops,
        "matmul_flops_per_step": counted,
        "mfu": (mfu_flops / step_s / (peak * devices)) if (mfu_flops and peak) else None,
        "peak_memory_bytes": memory,
        "jax_version": jax.__version__,
        "xla_options": xla.compiler_options(),
    }
  return _Side(run, result, num_params)


def _check_counts(steps: int, warmup: int):
  if steps < 1:
    raise ConfigError(f"steps must be >= 1, got {steps}")
  if warmup < 0:
    raise ConfigError(f"warmup must be >= 0, got {warmup}")


def benchmark(model: str, *, batch_size: int = 128, precision: str = "float32", steps: int = 20,
              warmup: int = 3, steps_per_call: int = 1, seed: int = 0,
              rnn_implementation: Optional[str] = None) -> Dict:
  """Times the training step of `model`; returns the figures described above.

  Arguments:
    model: a registered classifier name or 'dcgan'.
    batch_size: examples per step.
    precision: 'float32' or 'bfloat16' compute (parameters stay float32).
    steps: timed calls.
    warmup: untimed calls after compiling.
    steps_per_call: K steps per call, in one `lax.scan`.
    seed: of the synthetic data and initialisation.
    rnn_implementation: recurrent models: 'scan' or 'cudnn' (lstm on a CUDA
      GPU); None keeps the model's default ('scan').
  """
  _check_counts(steps, warmup)
  side = _jdl_side(model, batch_size=batch_size, precision=precision,
                   steps_per_call=steps_per_call, seed=seed, rnn_implementation=rnn_implementation)
  return _time_sides({"jdl": side}, steps, warmup)["jdl"]


def compare_torch(model: str, *, batch_size: int = 128, precision: str = "float32",
                  steps: int = 20, warmup: int = 3, steps_per_call: int = 1, seed: int = 0,
                  rnn_implementation: Optional[str] = None) -> Dict:
  """`benchmark` with the same architecture and step in PyTorch timed in the
  same loop, alternating every 5 steps; returns jdl's figures with 'torch'
  (its figures) and 'ratio_vs_torch' (jdl / PyTorch examples per second).

  On GPU the PyTorch side gets its fair best: channels_last, bfloat16
  autocast when precision is bfloat16, and torch.compile. Raises ConfigError
  if PyTorch is not installed, has no version of `model`, or its parameter
  count differs.
  """
  _check_counts(steps, warmup)
  jdl_side = _jdl_side(model, batch_size=batch_size, precision=precision,
                       steps_per_call=steps_per_call, seed=seed,
                       rnn_implementation=rnn_implementation)
  torch_side = _torch_side(model, batch_size=batch_size, precision=precision,
                           expected_params=jdl_side.params)
  results = _time_sides({"jdl": jdl_side, "torch": torch_side}, steps, warmup)
  result = results["jdl"]
  result["torch"] = results["torch"]
  result["ratio_vs_torch"] = result["examples_per_s"] / results["torch"]["examples_per_s"]
  return result


def compare_kernels(model: str, without, *, batch_size: int = 128, precision: str = "float32",
                    steps: int = 20, warmup: int = 3, seed: int = 0, replicas: int = 1) -> Dict:
  """The A/B of CPU kernels (`jdl.ops`): `model`'s step built with the
  selected kernels ('with') and with those less `without` ('without'),
  timed in one loop alternating every 5 steps, as `compare_torch`.

  Returns {'with': figures, 'without': figures, 'saving': the fraction of
  the step the kernels in `without` save (1 - with / without step time),
  'kernels': the names left out}. `replicas` > 1 times the step of
  --num_seeds=replicas (stacked states, one vmapped step). The process-wide `malloc` kernel cannot be
  A/B'd in one process: compare two runs of experiments.benchmark with
  --cpu_kernels instead.
  """
  from jdl import ops
  _check_counts(steps, warmup)
  base = ops.selected()
  without = ops.parse(without) if isinstance(without, str) else frozenset(without)
  if "malloc" in without:
    raise ConfigError("the malloc kernel is process-wide: compare two runs of "
                      "experiments.benchmark --cpu_kernels=... instead")
  sides, previous = {}, os.environ.get(ops.ENV)
  try:
    for name, kernels in (("with", base), ("without", base - without)):
      os.environ[ops.ENV] = ",".join(sorted(kernels)) or "0"
      xla.enable("xla_options" in kernels)
      sides[name] = _jdl_side(model, batch_size=batch_size, precision=precision,
                              steps_per_call=1, seed=seed, rnn_implementation=None,
                              replicas=replicas)
  finally:
    os.environ.pop(ops.ENV) if previous is None else os.environ.__setitem__(ops.ENV, previous)
    xla.enable("xla_options" in base)
  results = _time_sides(sides, steps, warmup)
  return {**results, "kernels": sorted(without),
          "saving": 1 - results["with"]["step_ms"] / results["without"]["step_ms"]}


def _torch_side(model: str, *, batch_size: int, precision: str,
                expected_params: Optional[int]) -> _Side:
  try:
    import torch
    from jdl import torch_reference
  except ImportError:
    raise ConfigError("--compare=torch needs PyTorch: pip install -e '.[torch]'") from None
  if model not in torch_reference.NAMES:
    raise ConfigError(f"no PyTorch version of {model!r}; --compare=torch supports: "
                      f"{', '.join(torch_reference.NAMES)}")
  params = torch_reference.count_params(model)
  if expected_params is not None and params != expected_params:
    raise ConfigError(f"PyTorch {model} has {params:,} parameters, jdl's has {expected_params:,}")
  cuda = torch.cuda.is_available()
  # As many threads as cores, as XLA:CPU uses (PyTorch's default too; set
  # explicitly so a caller's earlier setting does not skew the comparison).
  torch.set_num_threads(os.cpu_count() or 1)
  step = torch_reference.build(model, batch_size, device="cuda" if cuda else "cpu",
                               channels_last=cuda, compile=cuda,
                               autocast_bf16=precision == "bfloat16")
  start = time.perf_counter()
  step()  # compiles (torch.compile on GPU) and allocates
  compile_s = time.perf_counter() - start

  def run() -> float:
    start = time.perf_counter()
    step()  # synchronises itself
    return time.perf_counter() - start

  def result(times) -> Dict:
    if not all(np.isfinite(float(loss)) for loss in step.losses.values()):
      raise ConfigError(f"PyTorch {model} produced a non-finite loss on synthetic data")
    return {
        "framework": "torch",
        "model": model,
        "batch_size": batch_size,
        "precision": precision,
        "params": params,
        "device_kind": torch.cuda.get_device_name() if cuda else "cpu",
        "compile_s": compile_s,
        **_timing(times, batch_size),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
    }
  return _Side(run, result, params)
