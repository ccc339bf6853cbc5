"""XLA compile options for jdl's jitted steps, and `jit`, jax.jit with them.

On CPU, jaxlib 0.10's XLA hands convolutions (all but tiny ones) to YNNPACK
by default, which runs each on one thread: in a trace of the DCGAN step the
second core sat idle through the discriminator's largest convolution. XLA's
own (Eigen) kernels split each convolution over the whole thread pool, which
makes the steps of convolution-heavy models faster and leaves the recurrent
ones unchanged (A/B in BUILD_NOTES.md 3.8). Dots and reductions stay on
YNNPACK, as by default.

The option is experimental in XLA, so `compiler_options` first checks that
this jaxlib accepts it (one tiny compile per process) and is empty where it
does not, or off the CPU. It is the `xla_options` CPU kernel (`jdl.ops`):
the entrypoints turn it on (`enable()`, unless $JDL_CPU_KERNELS leaves it out);
a library user who wants it calls `jdl.xla.enable()`.
"""
import functools
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp

# Overwrites XLA:CPU's default list of YNNPACK fusions (dots, convolutions and
# reductions in jaxlib 0.10) with the same list less convolutions.
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
               "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


_ENABLED = False  # set by `enable()`


def enable(on: bool = True) -> None:
  """Compile jdl's steps with `CPU_OPTIONS` from now on (on the CPU backend)."""
  global _ENABLED
  _ENABLED = on


@functools.lru_cache(maxsize=None)
def _accepted_cpu_options() -> tuple:
  try:
    jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile(
        compiler_options=CPU_OPTIONS)
  except Exception:  # noqa: BLE001 -- a jaxlib without the option: run without it
    return ()
  return tuple(CPU_OPTIONS.items())


def compiler_options() -> Dict[str, str]:
  """The options jdl compiles its steps with ({} unless enabled, and off the CPU)."""
  if not _ENABLED or jax.default_backend() != "cpu":
    return {}
  return dict(_accepted_cpu_options())


def jit(fun: Callable, **kwargs: Any) -> Callable:
  """`jax.jit(fun, **kwargs)` compiled with `compiler_options()`. Call it where
  the step is built, not at import: choosing the options starts JAX's
  backend, after which the CPU device count is fixed."""
  return jax.jit(fun, compiler_options=compiler_options() or None, **kwargs)
