"""Losses, returned per example, and weight penalties.

Every loss maps a batch to PER-EXAMPLE values of shape (N,); the caller
averages (the optax convention). Keeping the batch axis lets a train step mask
padded examples of a last, partial batch before it averages:

  per_example = softmax_cross_entropy(logits, labels)    # (N,)
  loss = jnp.sum(per_example * valid) / jnp.sum(valid)   # valid: (N,) 0/1
  loss += l1 * l1_penalty(params) + l2 * l2_penalty(params)

Axes other than the batch axis (pixels, time steps) are averaged, so a loss on
(N, T, C) logits is the mean over the T positions of each example. Losses are
computed in float32 whatever the input dtype (bf16 logits lose too much in
log-sum-exp). The element-wise losses are optax's (`optax.losses`); this
module adds the per-example convention, class-id labels and the penalties.
"""
import jax
import jax.numpy as jnp
import optax


def _per_example(x):
  """(N, ...) -> (N,): mean over every non-batch axis; (N,) is returned as is."""
  return jnp.mean(jnp.reshape(x, (x.shape[0], -1)), axis=1)


def one_hot(labels, num_classes: int):
  """Integer class ids -> float32 one-hot rows.

  Arguments:
    labels: integer class ids, shape (N,) (or any shape S).
    num_classes: C, the number of classes.

  Returns:
    float32 array of shape (N, C) (or S + (C,)); ids outside [0, C) give a
    row of zeros.
  """
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def mean_squared_error(predictions, targets):
  """Squared error averaged over the non-batch axes.

  Arguments:
    predictions: (N, ...) floats.
    targets: same shape as `predictions`.

  Returns:
    (N,) float32: mean over each example's entries of (prediction - target)^2.
  """
  return _per_example(optax.losses.squared_error(jnp.asarray(predictions, jnp.float32),
                                                 jnp.asarray(targets, jnp.float32)))


def binary_cross_entropy(logits, labels):
  """Sigmoid cross-entropy on logits, stable for any logit magnitude.

  -[z log sigmoid(x) + (1 - z) log sigmoid(-x)], with log sigmoid computed as
  -softplus(-x) so that x = +-1000 gives finite values (never log(0)).

  Arguments:
    logits: (N, ...) raw scores x, before the sigmoid.
    labels: same shape, targets z in [0, 1] (hard 0/1 or soft).

  Returns:
    (N,) float32: the mean over each example's entries.
  """
  return _per_example(optax.losses.sigmoid_binary_cross_entropy(
      jnp.asarray(logits, jnp.float32), jnp.asarray(labels, jnp.float32)))


def _target_distribution(labels, logits, label_smoothing: float):
  """Labels (ids or probabilities) -> float32 target probabilities like logits."""
  num_classes = logits.shape[-1]
  labels = jnp.asarray(labels)
  if labels.ndim == logits.ndim - 1:  # Class ids, (N, ...).
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f"class-id labels must be integers, got {labels.dtype}")
    targets = one_hot(labels, num_classes)
  elif labels.ndim == logits.ndim:  # One-hot rows or probabilities, (N, ..., C).
    targets = labels.astype(jnp.float32)
  else:
    raise ValueError(
        f"labels of shape {labels.shape} fit neither ids nor one-hot rows for "
        f"logits of shape {logits.shape}")
  # Szegedy et al. 2016: the target keeps 1 - eps of its mass and spreads eps
  # uniformly over all C classes (the true one included), as Keras. Applied
  # unconditionally (exact for eps = 0) so eps may be a traced value.
  return optax.smooth_labels(targets, label_smoothing)


def softmax_cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Cross-entropy between softmax(logits) and the labels, per example.

  -sum_c target_c * log_softmax(logits)_c, where target is the one-hot (or given
  probability) row, smoothed to (1 - eps) * target + eps / C when
  `label_smoothing` = eps > 0.

  Arguments:
    logits: (N, ..., C) raw class scores, any float dtype (computed in float32).
    labels: either integer class ids of shape (N, ...), or one-hot rows /
      probabilities of shape (N, ..., C). Which one is decided by ndim.
    label_smoothing: eps in [0, 1); 0 leaves the targets as they are.

  Returns:
    (N,) float32 (averaged over any axes between batch and class).
  """
  logits = jnp.asarray(logits, jnp.float32)
  targets = _target_distribution(labels, logits, label_smoothing)
  # optax's log_softmax subtracts the max first: finite for logits of +-1000,
  # and a zero target times a very negative log-probability is an exact 0.
  return _per_example(optax.losses.softmax_cross_entropy(logits, targets))


def kl_divergence(target_probs, logits):
  """KL(p || softmax(logits)) = sum_c p_c (log p_c - log_softmax(logits)_c).

  Terms with p_c = 0 count as 0 (0 log 0 = 0), so one-hot targets are fine.
  Note the argument order: the target distribution first, the model's logits
  second (optax.kl_divergence takes log-predictions first).

  Arguments:
    target_probs: (N, ..., C) probabilities p, each row summing to 1.
    logits: (N, ..., C) raw class scores of the model's distribution q.

  Returns:
    (N,) float32, >= 0 up to rounding; 0 when softmax(logits) equals p.
  """
  log_q = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return _per_example(optax.losses.kl_divergence(log_q, jnp.asarray(target_probs, jnp.float32)))


# ----------------------------------------------------------------------------
# Weight penalties (scalars, not per example).
#
# Following Keras's `kernel_regularizer`, only weight arrays are penalized:
# leaves with ndim >= 2, i.e. Dense kernels (in, out), Conv kernels
# (kh, kw, in, out) and embeddings. Biases and BatchNorm/LayerNorm scales and
# offsets (ndim 1) are left out: they are few, do not grow the model's capacity
# the way weights do, and shrinking a normalization scale towards 0 only fights
# the layer that follows. `jdl.optim` uses the same mask for weight decay.
# ----------------------------------------------------------------------------


def kernel_mask(params):
  """Pytree of bools like `params`: True for weight arrays (ndim >= 2).

  Arguments:
    params: a parameter pytree (e.g. Flax `variables["params"]`).
  """
  return jax.tree.map(lambda w: jnp.ndim(w) >= 2, params)


def _kernels(params):
  return [w for w in jax.tree.leaves(params) if jnp.ndim(w) >= 2]


def l1_penalty(params):
  """sum |w| over every weight array (ndim >= 2) of `params`.

  The loss adds `l1 * l1_penalty(params)` (Keras L1(l1): no 1/N, no 1/2).

  Arguments:
    params: a parameter pytree.

  Returns:
    float32 scalar; 0 when there are no weight arrays.
  """
  return sum((jnp.sum(jnp.abs(w.astype(jnp.float32))) for w in _kernels(params)),
             jnp.zeros((), jnp.float32))


def l2_penalty(params):
  """sum w^2 over every weight array (ndim >= 2) of `params`.

  The loss adds `l2 * l2_penalty(params)` (Keras L2(l2): no 1/2 factor, so the
  gradient is 2 * l2 * w). This is coupled L2 regularization: it goes through
  the optimizer's preconditioning, unlike `weight_decay` in `jdl.optim`.

  Arguments:
    params: a parameter pytree.

  Returns:
    float32 scalar; 0 when there are no weight arrays.
  """
  return sum((jnp.sum(jnp.square(w.astype(jnp.float32))) for w in _kernels(params)),
             jnp.zeros((), jnp.float32))
