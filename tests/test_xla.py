"""jdl.xla: the compile options of jdl's steps (CPU convolutions off YNNPACK)."""
import jax
import numpy as np
import pytest

from jdl import xla


def _conv(x, kernel):  # a DCGAN discriminator conv: 4x4, stride 2, one pixel of padding
  return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.fixture
def enabled():
  """The options as the entrypoints turn them on (jdl.cli; off for library users)."""
  xla.enable()
  yield
  xla.enable(False)


def test_cpu_convolutions_leave_ynnpack_with_equal_values(enabled):
  if not xla.compiler_options():
    pytest.skip('this jaxlib does not accept the option (compiler_options() is empty)')
  assert xla.compiler_options() == xla.CPU_OPTIONS
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 16, 16, 32)).astype(np.float32)  # big enough for YNNPACK to take it
  kernel = rng.normal(size=(4, 4, 32, 64)).astype(np.float32)
  text = xla.jit(_conv).lower(x, kernel).compile().as_text()
  assert 'convolution(' in text and '__ynn_fusion' not in text
  # The gradient too, and the same values as the default compile's.
  loss = lambda x, k: (_conv(x, k) ** 2).sum()
  grads = xla.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)
  reference = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)
  for got, want in zip(grads, reference):  # float32 sums of 512-8192 terms, in another order
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_jit_passes_its_arguments_through():
  step = xla.jit(lambda state, x: (state + x, x.sum()), donate_argnums=0)
  state, total = step(np.zeros(3, np.float32), np.arange(3, dtype=np.float32))
  np.testing.assert_array_equal(state, [0, 1, 2])
  assert float(total) == 3.0
