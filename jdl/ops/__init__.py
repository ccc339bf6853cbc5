"""jdl's CPU kernels: faster stand-ins for plain Flax layers on XLA:CPU, chosen in one place.

A model reads as plain Flax: it declares its convolution, pooling and
recurrence as fields (`conv: Any = nn.Conv`, as Flax's ResNet example does),
and `choices(model_class)` fills those fields with the kernels below when the
backend is the CPU and the kernel is switched on. `jdl.models.build_model`,
the GAN, colorization and the text model build their modules with it.

  kernel            field           why (A/B in BUILD_NOTES.md, "CPU kernels")
  conv_vmap_loop    conv            a loop over stacked kernels under vmap
                                    (`jdl.seeds`) instead of a grouped conv
  max_pool          max_pool        max pooling's gradient as a few elementwise
                                    passes instead of select-and-scatter
  conv_transpose    conv_transpose  the stride-2 transposed conv as one matmul
                                    and shifted adds, with its own gradient
  lstm              lstm_loop       the LSTM layer with a hand-written gradient
  loops_per_device  loop_runner     one recurrent loop per CPU device (core);
                                    the recurrent entrypoints also split the CPU
                                    into one device per core
  xla_options       -               XLA's own convolution kernels instead of
                                    YNNPACK's single-threaded ones (entrypoints)
  malloc            -               glibc keeps freed memory (entrypoints)

The switch: $JDL_CPU_KERNELS (`1`/`all`, the default; `0`/`none`; or a comma
list of kernel names), and `--cpu_kernels` with the same values in every
entrypoint, which sets it. With `0` a run is plain Flax and plain XLA, for
anyone who suspects a kernel: outputs and gradients are the same up to float
rounding (tested for every benchmark model). The two process-wide ones
(`xla_options`, `malloc`) are applied by the entrypoints only (`jdl.cli`),
never on import; library users can call `jdl.xla.enable()` themselves.
"""
import dataclasses
import functools
import os
from typing import Any, Dict, FrozenSet, Optional

from jdl.errors import ConfigError

KERNELS = ("conv_vmap_loop", "max_pool", "conv_transpose", "lstm", "loops_per_device",
           "xla_options", "malloc")
ENV = "JDL_CPU_KERNELS"


def parse(spec: str) -> FrozenSet[str]:
  """The kernels a switch value selects: '1'/'all'/'' all, '0'/'none' none,
  else a comma list of names (ConfigError naming an unknown one)."""
  spec = spec.strip().lower()
  if spec in ("", "1", "all", "true"):
    return frozenset(KERNELS)
  if spec in ("0", "none", "false"):
    return frozenset()
  names = frozenset(n.strip() for n in spec.split(",") if n.strip())
  unknown = sorted(names - set(KERNELS))
  if unknown:
    raise ConfigError(f"unknown CPU kernel {unknown[0]!r} in {ENV}/--cpu_kernels; choose 1 (all), "
                      f"0 (none) or a comma list of: {', '.join(KERNELS)}")
  return names


def selected() -> FrozenSet[str]:
  """The kernels the switch ($JDL_CPU_KERNELS) turns on."""
  return parse(os.environ.get(ENV, "1"))


def on_cpu() -> bool:
  """Whether JAX's backend is the CPU (starts the backend: call when building, not on import)."""
  import jax
  return jax.default_backend() == "cpu"


def enabled(name: str) -> bool:
  """Whether kernel `name` is used: selected, and the backend is the CPU."""
  return name in selected() and on_cpu()


def _stand_ins(kernels: FrozenSet[str]) -> Dict[str, Any]:
  """{model field: its CPU stand-in} for the selected `kernels`."""
  from jdl.ops import conv, pool, recurrence
  out = {}
  if "conv_vmap_loop" in kernels:
    out["conv"] = conv.Conv
  if "conv_transpose" in kernels:
    out["conv_transpose"] = conv.ConvTranspose
  if "max_pool" in kernels:
    out["max_pool"] = pool.MaxPool
  if "lstm" in kernels:
    out["lstm_loop"] = recurrence.lstm_layer
  if "loops_per_device" in kernels:
    out["loop_runner"] = recurrence.split_over_devices
  return out


def _fields(module) -> set:
  while isinstance(module, functools.partial):
    module = module.func
  return {f.name for f in dataclasses.fields(module)} if dataclasses.is_dataclass(module) else set()


def choices(module, kernels: Optional[FrozenSet[str]] = None) -> Dict[str, Any]:
  """The field values that give `module` (a Module class or partial) the CPU kernels.

      model = CNN(num_classes=10, **ops.choices(CNN))

  Arguments:
    module: the module class (or a functools.partial of one) to build.
    kernels: the kernels to use; default: `selected()`, and none off the CPU.
  Returns:
    {field: stand-in} for the fields `module` has, e.g. {'conv': ops.conv.Conv,
    'max_pool': ops.pool.MaxPool}; {} off the CPU or with the switch off.
  """
  if kernels is None:
    kernels = selected() if on_cpu() else frozenset()
  fields = _fields(module)
  return {field: stand_in for field, stand_in in _stand_ins(frozenset(kernels)).items()
          if field in fields}
