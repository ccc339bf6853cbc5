"""Losses and metrics against independent NumPy/SciPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from jdl import losses, metrics

N, C = 6, 5

# Every function runs under jit, as in a train step; on CPU one compile is also
# much faster than the eager per-op compiles for each new shape.
one_hot = jax.jit(losses.one_hot, static_argnums=1)
mean_squared_error = jax.jit(losses.mean_squared_error)
binary_cross_entropy = jax.jit(losses.binary_cross_entropy)
softmax_cross_entropy = jax.jit(losses.softmax_cross_entropy)
kl_divergence = jax.jit(losses.kl_divergence)
l1_penalty = jax.jit(losses.l1_penalty)
l2_penalty = jax.jit(losses.l2_penalty)
accuracy = jax.jit(metrics.accuracy)
top_k_accuracy = jax.jit(metrics.top_k_accuracy, static_argnums=2)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def _np_log_softmax(x):
  return x - special.logsumexp(x, axis=-1, keepdims=True)


def test_one_hot(rng):
  labels = rng.integers(0, C, size=N)
  got = one_hot(labels, C)
  assert got.shape == (N, C) and got.dtype == jnp.float32
  np.testing.assert_array_equal(got, np.eye(C, dtype=np.float32)[labels])


def test_mean_squared_error(rng):
  pred = rng.normal(size=(N, 3, 4))
  target = rng.normal(size=(N, 3, 4))
  got = mean_squared_error(pred, target)
  assert got.shape == (N,)
  np.testing.assert_allclose(got, ((pred - target) ** 2).mean(axis=(1, 2)),
                             rtol=1e-5)
  # 1-D inputs: one value per example, the plain squared error.
  np.testing.assert_allclose(mean_squared_error(pred[:, 0, 0], target[:, 0, 0]),
                             (pred[:, 0, 0] - target[:, 0, 0]) ** 2, rtol=1e-5)


def test_binary_cross_entropy_matches_reference(rng):
  logits = rng.normal(size=(N, 7)) * 3
  labels = rng.uniform(size=(N, 7))  # Soft labels are allowed.
  p = special.expit(logits)
  want = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean(axis=1)
  got = binary_cross_entropy(logits, labels)
  assert got.shape == (N,)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_binary_cross_entropy_extreme_logits():
  logits = np.array([1000.0, -1000.0, 1000.0, -1000.0], np.float32)
  labels = np.array([1.0, 0.0, 0.0, 1.0], np.float32)
  got = np.asarray(binary_cross_entropy(logits, labels))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, [0.0, 0.0, 1000.0, 1000.0], rtol=1e-6)


def test_softmax_cross_entropy_int_and_one_hot(rng):
  logits = rng.normal(size=(N, C)) * 2
  labels = rng.integers(0, C, size=N)
  want = -_np_log_softmax(logits)[np.arange(N), labels]
  from_ids = softmax_cross_entropy(logits, labels)
  from_rows = softmax_cross_entropy(logits, np.eye(C)[labels])
  assert from_ids.shape == (N,)
  np.testing.assert_allclose(from_ids, want, rtol=1e-5)
  np.testing.assert_allclose(from_rows, from_ids, rtol=1e-6)


def test_softmax_cross_entropy_label_smoothing(rng):
  logits = rng.normal(size=(N, C))
  labels = rng.integers(0, C, size=N)
  eps = 0.1
  target = (1 - eps) * np.eye(C)[labels] + eps / C
  want = -(target * _np_log_softmax(logits)).sum(axis=1)
  for lab in (labels, np.eye(C, dtype=np.float32)[labels]):
    np.testing.assert_allclose(
        softmax_cross_entropy(logits, lab, label_smoothing=eps), want,
        rtol=1e-5)
  # Smoothing strictly changes the loss (the test could tell eps was ignored).
  assert not np.allclose(softmax_cross_entropy(logits, labels), want)


def test_softmax_cross_entropy_soft_labels_and_sequences(rng):
  logits = rng.normal(size=(N, 3, C))  # (N, T, C): mean over the T positions.
  probs = special.softmax(rng.normal(size=(N, 3, C)), axis=-1)
  want = -(probs * _np_log_softmax(logits)).sum(-1).mean(-1)
  np.testing.assert_allclose(softmax_cross_entropy(logits, probs), want,
                             rtol=1e-5)


def test_softmax_cross_entropy_extreme_and_bf16():
  logits = np.array([[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 0.0]], np.float32)
  got = np.asarray(softmax_cross_entropy(logits, np.array([0, 0])))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, [0.0, 2000.0], rtol=1e-6)
  smoothed = softmax_cross_entropy(logits, np.array([0, 0]), 0.1)
  assert np.all(np.isfinite(np.asarray(smoothed)))
  # bf16 logits are upcast: the result is float32 and matches float32 input.
  small = np.array([[0.5, -1.25, 2.0]], np.float32)
  got16 = softmax_cross_entropy(jnp.asarray(small, jnp.bfloat16), np.array([2]))
  assert got16.dtype == jnp.float32
  np.testing.assert_allclose(got16, softmax_cross_entropy(small, np.array([2])),
                             rtol=1e-6)


def test_softmax_cross_entropy_rejects_bad_labels():
  logits = np.zeros((N, C), np.float32)
  with pytest.raises(ValueError):
    softmax_cross_entropy(logits, np.zeros((N, C, 2)))
  with pytest.raises(ValueError):
    softmax_cross_entropy(logits, np.zeros((N,), np.float32))


def test_kl_divergence(rng):
  logits = rng.normal(size=(N, C)) * 2
  p = special.softmax(rng.normal(size=(N, C)), axis=-1)
  p[0] = np.eye(C)[1]  # A one-hot row exercises 0 log 0 = 0.
  want = (special.xlogy(p, p) - p * _np_log_softmax(logits)).sum(axis=1)
  got = np.asarray(kl_divergence(p, logits))
  assert got.shape == (N,) and np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got, special.rel_entr(p, special.softmax(logits, -1)).sum(1),
                             rtol=1e-4, atol=1e-6)
  assert np.all(got >= 0)
  # KL(p || p) = 0: logits = log p give softmax(logits) = p.
  q = p[1:]
  np.testing.assert_allclose(kl_divergence(q, np.log(q)), 0.0, atol=1e-6)
  # Extreme logits stay finite.
  extreme = np.array([[1000.0, -1000.0, 0.0, 0.0, 0.0]])
  assert np.all(np.isfinite(np.asarray(kl_divergence(p[:1], extreme))))


def _params(rng):
  return {
      "Dense_0": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))},
      "Conv_0": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=(4,))},
      "BatchNorm_0": {"scale": rng.normal(size=(4,)), "bias": rng.normal(size=(4,))},
  }


def test_penalties_use_kernels_only(rng):
  params = _params(rng)
  kernels = [params["Dense_0"]["kernel"], params["Conv_0"]["kernel"]]
  l1 = l1_penalty(params)
  l2 = l2_penalty(params)
  assert l1.shape == () and l2.shape == ()
  np.testing.assert_allclose(l1, sum(np.abs(k).sum() for k in kernels), rtol=1e-5)
  np.testing.assert_allclose(l2, sum((k ** 2).sum() for k in kernels), rtol=1e-5)
  mask = losses.kernel_mask(params)
  assert mask["Dense_0"] == {"kernel": True, "bias": False}
  assert mask["BatchNorm_0"] == {"scale": False, "bias": False}
  assert float(l2_penalty({"bias": np.ones(3)})) == 0.0


def test_accuracy(rng):
  logits = rng.normal(size=(50, C))
  labels = rng.integers(0, C, size=50)
  want = (np.argmax(logits, axis=1) == labels).astype(np.float32)
  assert 0 < want.sum() < 50  # Both outcomes occur, so a constant would fail.
  np.testing.assert_array_equal(accuracy(logits, labels), want)
  np.testing.assert_array_equal(accuracy(logits, np.eye(C)[labels]), want)


@pytest.mark.parametrize("k", [1, 2, 3, C])
def test_top_k_accuracy(rng, k):
  logits = rng.normal(size=(50, C))
  labels = rng.integers(0, C, size=50)
  top = np.argsort(logits, axis=1)[:, -k:]
  want = (top == labels[:, None]).any(axis=1).astype(np.float32)
  got = top_k_accuracy(logits, labels, k)
  assert got.shape == (50,)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(top_k_accuracy(logits, np.eye(C)[labels], k),
                                want)
