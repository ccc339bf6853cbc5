"""What every experiment entrypoint shares: flags, errors, compile cache.

- `define_flags(TrainConfig)` makes one absl flag per config field, with the
  field's help text and default, so entrypoints stay a few lines long.
- `config_from_flags` reads them back (plus a preset, where explicit flags win).
- `run(main)` runs an absl main that prints any `JdlError` as a one-line
  `error: ...` and exits with status 2 -- never a traceback for bad input.
- `enable_compilation_cache()` turns on JAX's persistent compilation cache, so a
  second run of the same configuration skips most of its compile time.
- `tune_malloc()` keeps freed memory in the process (glibc), and `jdl.xla`'s
  compile options: the two process-wide CPU kernels (`jdl.ops`), applied by
  `call` for every entrypoint on a CPU host unless `--cpu_kernels` (or
  $JDL_CPU_KERNELS) leaves them out.
"""
import dataclasses
import functools
import os
import sys
import typing
from typing import Optional, Sequence

from absl import app, flags, logging

from jdl import ops
from jdl.errors import Interrupted, JdlError

FLAGS = flags.FLAGS


def _base_type(annotation):
  """float for Optional[float], tuple for Tuple[float, ...], etc."""
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  origin = typing.get_origin(annotation)
  if origin is typing.Union:
    return _base_type(args[0])
  if origin in (tuple, list):
    return tuple
  return annotation


def define_flags(config_cls, skip: Sequence[str] = (), defaults: Optional[dict] = None) -> None:
  """Defines one absl flag per dataclass field of `config_cls`.

  Arguments:
    config_cls: the config dataclass.
    skip: fields that get no flag.
    defaults: flag defaults that differ from the dataclass's (e.g. another
      default dataset for another experiment).

  The flags are registered as the calling module's, so `--help` on an
  entrypoint lists them (absl shows only the main module's flags there).
  """
  caller = sys._getframe(1).f_globals.get("__name__", "")
  module_name = sys.argv[0] if caller == "__main__" else caller
  for field in dataclasses.fields(config_cls):
    if field.name in skip or field.name in FLAGS:
      continue
    kind = _base_type(field.type)
    help_text = field.metadata.get("help", field.name)
    default = (defaults or {}).get(field.name, field.default)
    if kind is bool:
      flags.DEFINE_boolean(field.name, default, help_text, module_name=module_name)
    elif kind is int:
      flags.DEFINE_integer(field.name, default, help_text, module_name=module_name)
    elif kind is float:
      flags.DEFINE_float(field.name, default, help_text, module_name=module_name)
    elif kind is tuple:
      flags.DEFINE_list(field.name, [str(v) for v in default], help_text, module_name=module_name)
    else:
      flags.DEFINE_string(field.name, default, help_text, module_name=module_name)


def config_from_flags(config_cls, preset: str = "", apply_preset=None):
  """Builds `config_cls` from the parsed flags; explicitly set flags beat the preset."""
  values = {}
  for field in dataclasses.fields(config_cls):
    if field.name not in FLAGS:
      continue
    value = FLAGS[field.name].value
    if _base_type(field.type) is tuple:
      try:
        value = tuple(float(v) for v in value)
      except ValueError:
        raise JdlError(f"--{field.name} must be a comma-separated list of numbers, got {value}") from None
    if isinstance(value, str) and value.startswith("~"):
      value = os.path.expanduser(value)  # --data_dir=~/data as a shell would expand it
    values[field.name] = value
  config = config_cls(**values)
  if apply_preset is not None:
    explicit = {name for name in values if FLAGS[name].present}
    config = apply_preset(config, preset, explicit)
  return config


def enable_compilation_cache(path: Optional[str] = None) -> str:
  """Persists compiled XLA programs on disk ($JDL_CACHE_DIR or ~/.cache/jdl/xla)."""
  import jax
  path = path or os.environ.get("JDL_CACHE_DIR") or os.path.expanduser("~/.cache/jdl/xla")
  jax.config.update("jax_compilation_cache_dir", path)
  # Cache every program, however quick to compile: on CPU most are sub-second.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def tune_malloc() -> bool:
  """Makes glibc's malloc keep and reuse freed memory instead of unmapping it.

  XLA:CPU allocates each executable's temporary buffer per call, and glibc
  serves blocks over 32 MB with a fresh mmap that is unmapped on free, so
  every training step page-faults its whole temp buffer in again (A/B in
  BUILD_NOTES.md 3.8). With mmap off (M_MMAP_MAX = 0), trimming off
  (M_TRIM_THRESHOLD = 2 GiB) and one arena (M_ARENA_MAX = 1: XLA's worker
  threads would otherwise allocate from per-thread heaps, which glibc
  unmaps whenever they empty), blocks come from the heap and stay
  there, so the process keeps its peak memory. Call it before JAX starts its
  threads. Returns whether it was applied (glibc on Linux only; a no-op
  elsewhere).
  """
  if not sys.platform.startswith("linux"):
    return False
  import ctypes
  try:
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's malloc.h
    return all(libc.mallopt(option, value) for option, value in (
        (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1), (m_arena_max, 1)))
  except (OSError, AttributeError):  # not glibc (musl has no mallopt)
    return False


def _deterministic_gpu() -> None:
  """Makes XLA:GPU pick deterministic kernels (scatter, reductions); slower.

  Must run before JAX starts its backend, which is why it is a flag of `run`
  and not a config field. CPU runs are bit-reproducible without it.
  """
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()
  os.environ["TF_CUDNN_DETERMINISTIC"] = "1"


def define_common_flags() -> None:
  """Flags every entrypoint has: --deterministic (see `_deterministic_gpu`),
  the multi-host ones and --cpu_devices (see `jdl.parallel`)."""
  if "deterministic" not in FLAGS:
    flags.DEFINE_boolean("deterministic", False,
                         "GPU: deterministic XLA kernels (--xla_gpu_deterministic_ops), "
                         "bit-identical reruns at some speed cost; CPU runs are deterministic anyway",
                         module_name=sys.argv[0])
    flags.DEFINE_string("coordinator_address", None,
                        "multi-host: HOST:PORT of process 0, the same for every process",
                        module_name=sys.argv[0])
    flags.DEFINE_integer("num_processes", 1, "multi-host: number of processes (hosts)",
                         module_name=sys.argv[0])
    flags.DEFINE_integer("process_id", 0, "multi-host: this process's index in [0, num_processes)",
                         module_name=sys.argv[0])
    flags.DEFINE_string("cpu_kernels", None,
                        "jdl's CPU kernels (jdl.ops): 1 all (default), 0 none (plain Flax and XLA, "
                        "to compare), or a comma list of: " + ", ".join(ops.KERNELS)
                        + "; sets $JDL_CPU_KERNELS", module_name=sys.argv[0])
    flags.DEFINE_integer("cpu_devices", None,
                         "CPU backend: split the host into N devices (one per core is the useful "
                         "value); training is then data parallel over them, and recurrent layers "
                         "run one loop per device, each on its own core. Default: one per core "
                         "(at least 32 examples each) when training a recurrent model, else 1",
                         module_name=sys.argv[0])


def parse_flags(argv):
  """absl's flag parsing, with a bad flag (unknown name, wrong type) as one line, exit 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _choose_cpu_devices(auto_cpu_devices) -> int:
  """--cpu_devices if given; else `auto_cpu_devices()` (1 without one, where
  XLA_FLAGS already fixes the count, or with the loops_per_device kernel off)."""
  from jdl import parallel
  if FLAGS.cpu_devices is not None:
    return FLAGS.cpu_devices
  if (auto_cpu_devices is None or parallel.forced_host_devices()
      or "loops_per_device" not in ops.selected()):
    return 1
  return auto_cpu_devices()


def cpu_host() -> bool:
  """Whether JAX will run on the CPU, judged without starting its backend (which
  would fix the device count): JAX_PLATFORMS names cpu first, or no GPU or TPU
  plugin is installed."""
  import importlib.util
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
             "libtpu")
  return not any(importlib.util.find_spec(name) for name in plugins)


def call(main, argv, auto_cpu_devices=None) -> None:
  """Calls an absl `main(argv)` after parsing, turning user errors into one line.

  JdlError -> `error: ...` on stderr, exit 2; Interrupted (a checkpoint was
  saved on SIGTERM/SIGINT) -> its message, exit 128 + signal.
  auto_cpu_devices: () -> int, the CPU device count when --cpu_devices is
  not given (the entrypoints that train recurrent models pass
  `parallel.auto_cpu_devices` of their batch); None: one device.
  """
  if FLAGS.deterministic:
    _deterministic_gpu()
  if FLAGS.cpu_kernels is not None:
    try:
      ops.parse(FLAGS.cpu_kernels)
    except JdlError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    os.environ[ops.ENV] = FLAGS.cpu_kernels  # read by jdl.ops when models are built
  try:
    kernels = ops.selected()
  except JdlError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if cpu_host():  # the process-wide kernels, in entrypoints only
    if "malloc" in kernels:
      tune_malloc()
    from jdl import xla
    xla.enable("xla_options" in kernels)
  if not FLAGS["verbosity"].present:
    # Orbax logs every checkpoint at INFO and TFDS warns about empty data
    # dirs it is only probing; keep the console for progress and jdl's own
    # messages. --verbosity=0 brings them back.
    logging.set_verbosity(logging.ERROR)
  if len(argv) > 1:
    print(f"error: unexpected arguments {' '.join(argv[1:])} (flags look like --name=value)",
          file=sys.stderr)
    sys.exit(2)
  try:
    from jdl import parallel
    cpu_devices = _choose_cpu_devices(auto_cpu_devices)
    if cpu_devices != 1:
      try:
        parallel.set_cpu_devices(cpu_devices)
      except JdlError:  # JAX already started (main called in-process): keep its devices
        if FLAGS.cpu_devices is not None:
          raise
    if FLAGS.coordinator_address or FLAGS.num_processes > 1:
      if not FLAGS.coordinator_address:
        raise JdlError("--num_processes > 1 needs --coordinator_address=HOST:PORT of process 0")
      parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    return main(argv)
  except Interrupted as e:  # A checkpoint was saved; not an error.
    print(str(e), file=sys.stderr)
    sys.exit(e.exit_code)
  except JdlError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:  # A second Ctrl-C, or one outside the training loop.
    print("interrupted; rerun with the same --workdir to resume from the last checkpoint",
          file=sys.stderr)
    sys.exit(130)


def run(main, auto_cpu_devices=None) -> None:
  """absl's app.run with one-line errors for bad flags and user errors (see `call`)."""
  define_common_flags()
  app.run(functools.partial(call, main, auto_cpu_devices=auto_cpu_devices), flags_parser=parse_flags)
