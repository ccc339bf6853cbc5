"""Test-wide settings.

- Strict rank promotion, so silent broadcasting bugs fail (as Equinox does).
- A persistent XLA compilation cache shared by the tests and the entrypoint
  subprocesses they start: the same small models compile once per machine.
"""
import os
import tempfile

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

CACHE_DIR = os.path.join(tempfile.gettempdir(), "jdl-test-xla-cache")
os.environ["JDL_CACHE_DIR"] = CACHE_DIR  # Inherited by entrypoint subprocesses.
os.environ["JDL_DATA_MIRROR"] = "http://127.0.0.1:9/"  # Dead port: data downloads/probes never leave.

from jdl.cli import enable_compilation_cache  # noqa: E402

enable_compilation_cache(CACHE_DIR)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _library_defaults():
  """Entrypoints called in-process (jdl.cli.call) turn on jdl.xla's compile
  options, as for a real run; later tests see the library's defaults again."""
  yield
  from jdl import xla
  xla.enable(False)
