"""Classification metrics, per example like the losses in `jdl.losses`.

Each metric returns float32 values of shape (N,) (0 or 1 for a single
prediction per example), so the caller averages and can mask padded examples
exactly as it does for the loss. Labels are integer class ids (N, ...) or
one-hot / probability rows (N, ..., C), told apart by ndim; for one-hot or soft
labels the true class is the argmax of the row.
"""
import jax.numpy as jnp


def _class_ids(labels, logits):
  """Labels (ids or rows) -> integer class ids of shape logits.shape[:-1]."""
  labels = jnp.asarray(labels)
  if labels.ndim == logits.ndim:  # One-hot / probability rows.
    return jnp.argmax(labels, axis=-1)
  if labels.ndim == logits.ndim - 1:
    return labels.astype(jnp.int32)
  raise ValueError(
      f"labels of shape {labels.shape} fit neither ids nor one-hot rows for "
      f"logits of shape {logits.shape}")


def _per_example(x):
  """(N, ...) -> (N,): mean over every non-batch axis."""
  return jnp.mean(jnp.reshape(x, (x.shape[0], -1)), axis=1)


def accuracy(logits, labels):
  """1.0 where argmax(logits) is the true class, else 0.0.

  Arguments:
    logits: (N, ..., C) class scores (probabilities work too).
    labels: class ids (N, ...) or one-hot rows (N, ..., C).

  Returns:
    (N,) float32; for (N, T, C) logits, the fraction of the T positions right.
  """
  logits = jnp.asarray(logits)
  hit = jnp.argmax(logits, axis=-1) == _class_ids(labels, logits)
  return _per_example(hit.astype(jnp.float32))


def top_k_accuracy(logits, labels, k: int):
  """1.0 where the true class is among the k highest logits, else 0.0.

  The true class counts as in the top k when fewer than k classes score
  strictly higher; classes tied with it at the boundary therefore all count,
  as in tf.math.in_top_k (Keras top_k_categorical_accuracy). With distinct
  logits this is "label in argsort(logits)[-k:]".

  Arguments:
    logits: (N, ..., C) class scores.
    labels: class ids (N, ...) or one-hot rows (N, ..., C).
    k: how many top classes count, 1 <= k; k >= C gives all ones.

  Returns:
    (N,) float32.
  """
  logits = jnp.asarray(logits, jnp.float32)
  ids = _class_ids(labels, logits)
  true_logit = jnp.take_along_axis(logits, ids[..., None], axis=-1)  # (N, ..., 1)
  rank = jnp.sum(logits > true_logit, axis=-1)  # classes strictly above: (N, ...)
  return _per_example((rank < k).astype(jnp.float32))
