"""jdl.ops, the CPU kernels: each equals the plain Flax layer it stands in for
(outputs and gradients), takes the path it claims, and the switch turns them off."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdl import ops
from jdl.errors import ConfigError
from jdl.models import layers
from jdl.ops import conv as ops_conv, pool as ops_pool


@pytest.mark.parametrize("shape,window", [((3, 8, 8, 4), (2, 2)), ((2, 9, 7, 3), (2, 2)),
                                          ((2, 12, 12, 2), (3, 3)), ((2, 8, 6, 1), (2, 3))])
def test_tiled_max_pool_matches_reference(shape, window):
  x = jax.random.normal(jax.random.key(0), shape)  # Continuous values: no ties.
  reference = lambda x: nn.max_pool(x, window, window, "VALID")
  fast = lambda x: ops_pool.MaxPool(window).apply({}, x)
  np.testing.assert_array_equal(fast(x), reference(x))
  weights = jax.random.normal(jax.random.key(1), reference(x).shape)
  grad = lambda f: jax.grad(lambda x: (f(x) * weights).sum())(x)
  np.testing.assert_array_equal(grad(fast), grad(reference))


@pytest.mark.parametrize("shape,window", [((3, 8, 8, 4), (2, 2)), ((2, 9, 7, 3), (3, 2))])
def test_tiled_max_pool_gradient_goes_to_the_first_tied_maximum(shape, window):
  """Ties (small integers, and the zeros after a ReLU) get nn.max_pool's gradient exactly."""
  x = jnp.round(jax.random.normal(jax.random.key(0), shape))  # many tied values
  reference = lambda x: nn.max_pool(jax.nn.relu(x), window, window, "VALID")
  fast = lambda x: ops_pool.MaxPool(window).apply({}, jax.nn.relu(x))
  weights = jax.random.normal(jax.random.key(1), reference(x).shape)
  grad = lambda f: jax.grad(lambda x: (f(x) * weights).sum())(x)
  np.testing.assert_array_equal(grad(fast), grad(reference))
  ties = jax.grad(lambda x: (ops_pool.max_pool_tiled(x, window) * weights).sum())(jnp.ones(shape))
  assert ties.sum() == pytest.approx(float(weights.sum()), rel=1e-5)  # each window once
  assert int((ties != 0).sum()) == weights.size  # one element per window


def test_overlapping_and_padded_pools_use_reference():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  expected = nn.max_pool(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf),
                         (3, 3), (2, 2), "VALID")
  for pool in (layers.MaxPool, ops_pool.MaxPool):
    np.testing.assert_array_equal(pool(3, strides=2, padding=((1, 1), (1, 1))).apply({}, x), expected)


@pytest.mark.parametrize("shape,features,kernel,strides,padding", [
    ((2, 9, 9, 3), 5, 2, 1, "SAME"),       # even kernel, SAME pads (0, 1)
    ((2, 8, 8, 4), 6, 3, 1, "VALID"),
    ((2, 9, 8, 3), 4, 4, 2, "SAME"),       # a DCGAN discriminator conv
    ((2, 7, 7, 2), 3, (3, 2), (2, 1), ((1, 2), (0, 1))),
])
def test_conv_matches_flax_conv(shape, features, kernel, strides, padding):
  x = jax.random.normal(jax.random.key(0), shape)
  fast = ops_conv.Conv(features, kernel, strides, padding)
  reference = nn.Conv(features, layers._pair(kernel), layers._pair(strides), padding)
  params = reference.init(jax.random.key(1), x)
  # Same parameter tree and initialisation for the same key.
  jax.tree.map(np.testing.assert_array_equal, fast.init(jax.random.key(1), x), params)
  out = jax.jit(reference.apply)(params, x)
  np.testing.assert_allclose(jax.jit(fast.apply)(params, x), out, rtol=1e-5, atol=1e-5)
  weights = jax.random.normal(jax.random.key(2), out.shape)
  # Jitted: op-by-op, the k*k slices of conv_patches would each compile alone.
  grad = lambda m: jax.jit(jax.grad(lambda p, x: (m.apply(p, x) * weights).sum(),
                                    argnums=(0, 1)))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               grad(fast), grad(reference))


@pytest.mark.parametrize("shape,features,kernel,strides", [
    ((2, 9, 9, 3), 8, 3, 1),
    ((2, 8, 6, 16), 6, 4, 2),   # a DCGAN discriminator conv
])
def test_conv_over_stacked_kernels_is_a_loop_not_a_grouped_conv(shape, features, kernel, strides):
  """vmap over replicas (jdl.seeds): each replica's gradient equals its own
  (nn.Conv's), and the compiled step has no grouped convolution, which
  XLA:CPU ran 1.7-2.5x slower than one convolution per replica."""
  replicas = 3
  x = jax.random.normal(jax.random.key(0), (replicas, *shape))
  fast = ops_conv.Conv(features, kernel, strides)
  reference = nn.Conv(features, layers._pair(kernel), layers._pair(strides), "SAME")
  params = jax.vmap(reference.init)(jax.random.split(jax.random.key(1), replicas), x)
  weights = jax.random.normal(jax.random.key(2), jax.eval_shape(jax.vmap(reference.apply), params, x).shape)

  def grad(module):
    return jax.grad(lambda p, x, w: (module.apply(p, x) * w).sum(), argnums=(0, 1))

  stacked = jax.jit(jax.vmap(grad(fast)))
  expected = [jax.jit(grad(reference))(jax.tree.map(lambda a: a[i], params), x[i], weights[i])
              for i in range(replicas)]
  got = stacked(params, x, weights)
  for i in range(replicas):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-4), got, expected[i])
  grouped = lambda f: [c for c in ("feature_group_count=", "batch_group_count=")
                       if c in f.lower(params, x, weights).compile().as_text()]
  assert grouped(jax.jit(jax.vmap(grad(reference)))), "premise: XLA batches nn.Conv as a grouped conv"
  assert not grouped(stacked)
  # With the kernel shared, the mapped axis joins the batch as usual.
  one = jax.tree.map(lambda a: a[0], params)
  shared = jax.jit(jax.vmap(lambda x: fast.apply(one, x)))(x)
  np.testing.assert_allclose(shared, jax.jit(reference.apply)(one, x.reshape(-1, *shape[1:])).reshape(
      shared.shape), rtol=1e-5, atol=1e-5)


def test_the_switch_and_choices(monkeypatch):
  """One switch: $JDL_CPU_KERNELS (the entrypoints' --cpu_kernels sets it)."""
  from jdl.models import CNN, RNNClassifier, build_model
  from jdl.models.decoder import Generator
  monkeypatch.setenv(ops.ENV, "1")
  assert ops.selected() == frozenset(ops.KERNELS)
  assert ops.choices(CNN) == {"conv": ops_conv.Conv, "max_pool": ops_pool.MaxPool}
  assert set(ops.choices(RNNClassifier)) == {"lstm_loop", "loop_runner"}
  assert ops.choices(Generator) == {"conv_transpose": ops_conv.ConvTranspose}
  assert build_model("cnn").conv is ops_conv.Conv
  monkeypatch.setenv(ops.ENV, "max_pool,lstm")
  assert ops.choices(CNN) == {"max_pool": ops_pool.MaxPool}
  monkeypatch.setenv(ops.ENV, "0")
  assert ops.choices(CNN) == {} and build_model("cnn").conv is nn.Conv
  assert build_model("cnn").max_pool is layers.MaxPool
  monkeypatch.setenv(ops.ENV, "max_pool,fast_math")
  with pytest.raises(ConfigError, match="unknown CPU kernel 'fast_math'.*choose 1 \\(all\\), 0 \\(none\\)"):
    ops.selected()


# The models of `experiments.benchmark --compare=torch` (the dcgan below), in a
# small width where the architecture allows: the same layer kinds, so every
# kernel path the full size takes is taken. (Each kernel alone is tested above.)
BENCHMARK_MODELS = [
    ("cnn", {}, (16, 16, 3)), ("resnet18", dict(widths=(8, 16, 32, 64)), (16, 16, 3)),
    ("fastnet", dict(widths=(8, 16, 16)), (16, 16, 3)), ("lstm", dict(hidden_size=16), (12, 8)),
]


def _outputs_and_gradients(model, variables, x, labels):
  def loss(params, x):
    (logits, _), _ = model.apply({**variables, "params": params}, x, train=True,
                                 rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels]), logits
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      variables["params"], x)
  return logits, grads


@pytest.mark.parametrize("name,overrides,shape", BENCHMARK_MODELS, ids=[m[0] for m in BENCHMARK_MODELS])
def test_kernels_on_and_off_give_the_same_outputs_and_gradients(monkeypatch, name, overrides, shape):
  """The switch's promise: with every CPU kernel off a model is plain Flax and
  computes what it computes with them on, up to float rounding."""
  from jdl.models import build_model
  x = jax.random.normal(jax.random.key(0), (2, *shape))
  labels = jnp.arange(2)
  results = {}
  for switch in ("1", "0"):
    monkeypatch.setenv(ops.ENV, switch)
    model = build_model(name, **overrides)
    variables = model.init(jax.random.key(1), x[:1], train=False)
    results[switch] = _outputs_and_gradients(model, variables, x, labels)
  (logits_on, grads_on), (logits_off, grads_off) = results["1"], results["0"]
  np.testing.assert_allclose(logits_on, logits_off, rtol=1e-4, atol=1e-5)
  scale = lambda tree: max(float(np.abs(a).max()) for a in jax.tree.leaves(tree))
  atol = 1e-5 * scale(grads_off)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=atol), grads_on, grads_off)


def test_dcgan_same_with_kernels_on_and_off(monkeypatch):
  from jdl import gan
  from jdl.models.decoder import Discriminator, Generator
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  results = {}
  for switch in ("1", "0"):
    monkeypatch.setenv(ops.ENV, switch)
    g = Generator((16, 16, 3), 16, **ops.choices(Generator))
    d = Discriminator(8, **ops.choices(Discriminator))
    state = gan.create_gan_state(g, d, (16, 16, 3), 8, jax.random.key(1))
    new, metrics = jax.jit(gan.gan_train_step)(state, images, None, jax.random.key(2))
    results[switch] = (metrics, new.g.params, new.d.params)
  assert results["1"][0]["status"] == 0
  for key in ("d_loss", "g_loss", "d_grad_norm", "g_grad_norm"):
    np.testing.assert_allclose(results["1"][0][key], results["0"][0][key], rtol=1e-4)
  # One Adam step from the same start: the updated parameters agree.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
               results["1"][1:], results["0"][1:])
