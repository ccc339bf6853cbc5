"""Output heads: what the model's last layer means, its loss, metrics and best checkpoint.

The classifier task (`jdl.train`) is one loop for four kinds of output; a head
says, at fixed points, what is specific to its kind:

  softmax     C logits for one class of C (class ids (N,) in [0, C)).
              Loss: softmax cross-entropy with label smoothing (jdl.losses).
              Metrics: accuracy, top-5 when C > 5. Best: max accuracy.
  sigmoid     1 logit for two classes (ids 0/1, C = 2): p(1) = sigmoid(logit).
              Loss: binary cross-entropy on the logit. Metrics: accuracy
              (p > 1/2), ROC AUC. Best: min loss.
  multilabel  C logits, one logistic output per label (multi-hot (N, C) rows).
              Loss: binary cross-entropy per label, mean over labels. Metrics:
              exact match, F1 per label and their mean (p > 1/2). Best: max mean F1.
  regression  1 linear output for a real target (float32 (N,), C = 1).
              Loss: MSE or MAE on targets standardised by the training split.
              Metrics: RMSE and MAE in the target's units, R^2. Best: min RMSE.

Why the sigmoid head keeps the checkpoint with the lowest validation loss, not
the highest ROC AUC: AUC only ranks, so it saturates near 1 on an easy split
(footwear vs the rest is >= 0.99 after one epoch) and the engine keeps the
earliest of equal values; it also ignores calibration, on which the p > 0.5
accuracy depends. Binary cross-entropy is a proper scoring rule that keeps
resolving (Keras's ModelCheckpoint monitors val_loss by default).

Evaluation metrics are masked sums over padded batches (one compiled function
serves a split of any size); F1 comes from summed true/false positives and
false negatives per label, R^2 from sums of y and y^2. ROC AUC is not a sum: the
sigmoid head gathers each batch's logits and the host computes it exactly
(Mann-Whitney U with tied scores counted 1/2) for the split.

    head = heads.from_config(config)   # e.g. heads.Sigmoid()
    loss = head.loss(logits, labels, label_smoothing).mean()
"""
import dataclasses
from typing import Dict, List, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from jdl import losses, metrics as metrics_lib
from jdl.errors import ConfigError
from jdl.registry import Registry

# (metric, short label, format) for a log line: 'val loss 0.1234 acc 95.00%'.
Shown = Tuple[Tuple[str, str, str], ...]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> Optional[float]:
  """Area under the ROC curve: P(score of a positive > score of a negative).

  The Mann-Whitney U statistic from tie-averaged ranks, so tied scores count
  1/2 (as sklearn's roc_auc_score). None when either class is absent.

  Arguments:
    scores: (N,) scores, higher meaning more positive (logits or probabilities).
    labels: (N,) 0/1.
  """
  from scipy.stats import rankdata
  positive = np.asarray(labels).reshape(-1) > 0.5
  num_pos, num_neg = int(positive.sum()), int((~positive).sum())
  if not num_pos or not num_neg:
    return None
  ranks = rankdata(np.asarray(scores, np.float64).reshape(-1))  # 1-based, ties averaged
  u = ranks[positive].sum() - num_pos * (num_pos + 1) / 2
  return float(u / (num_pos * num_neg))


def f1_scores(tp, fp, fn) -> np.ndarray:
  """Per-label F1 = 2 TP / (2 TP + FP + FN); 0 where a label is neither present
  nor predicted (sklearn's zero_division=0)."""
  tp, fp, fn = (np.asarray(x, np.float64) for x in (tp, fp, fn))
  denominator = 2 * tp + fp + fn
  return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1e-300), 0.0)


def _smooth_binary(labels, label_smoothing: float):
  """0/1 targets as float32, pulled towards 1/2 by eps (Keras's binary label smoothing)."""
  return jnp.asarray(labels, jnp.float32) * (1.0 - label_smoothing) + 0.5 * label_smoothing


def _means(sums: Dict[str, np.ndarray], replicas: int) -> Dict[str, object]:
  """Sums -> means per example ('count' removed): floats, or (N,) arrays for replicas."""
  count = np.maximum(sums.pop("count"), 1.0)
  return {k: (v / count if replicas else float(v) / float(count)) for k, v in sums.items()}


@dataclasses.dataclass(frozen=True)
class Head:
  """The interface; see the module docstring. Frozen: a head is a static part of
  the jitted step. Logits are float32 (B, outputs); `labels` as the dataset holds them."""
  name = "head"
  best = ("loss", "min")  # (evaluation metric, 'max' or 'min')
  primary = "loss"  # the headline metric: curves against time, the time_to_* result
  shown = (("loss", "loss", ".4f"),)
  final = (("loss", "loss", ".4f"),)  # the test line
  panels = ()  # learning-curve panels besides the loss
  label_types = ("class",)

  def outputs(self, num_classes: int) -> int:
    """Model outputs for a dataset of `num_classes`."""
    return num_classes

  def fits(self, label_type: str, num_classes: int) -> bool:
    """Whether this head can learn labels of this type and count."""
    return label_type in self.label_types

  def with_stats(self, train_labels: np.ndarray) -> "Head":
    """This head with whatever it learns from the training labels (regression: their mean/std)."""
    return self

  def encode(self, split):
    """A split's (inputs, labels) as the step sees them (regression: standardised)."""
    return split

  def record(self) -> dict:
    """Extra config.json fields that rebuilding the predictions needs."""
    return {}

  def loss(self, logits, labels, label_smoothing: float = 0.0):
    """(B,) float32 per-example loss."""
    raise NotImplementedError

  def train_metrics(self, logits, labels) -> Dict[str, jnp.ndarray]:
    """Batch means for the training row, besides the loss."""
    return {}

  def sum_shapes(self, outputs: int) -> Dict[str, tuple]:
    """{name: shape} of eval_sums' sums (all float32)."""
    raise NotImplementedError

  def eval_sums(self, logits, labels, mask):
    """(sums over the real (mask 1) examples, per-example values to gather ({} if none))."""
    raise NotImplementedError

  def finish(self, sums, gathered: List[dict], labels, mask, replicas: int = 0) -> dict:
    """A split's metrics on the host from summed `sums` and the gathered batches."""
    return _means(dict(sums), replicas)


@dataclasses.dataclass(frozen=True)
class Softmax(Head):
  """One class of C: softmax cross-entropy (jdl.losses, with label smoothing)."""
  name = "softmax"
  top_k: int = 5
  best = ("accuracy", "max")
  primary = "accuracy"
  shown = (("loss", "loss", ".4f"), ("accuracy", "acc", ".2%"))
  final = (("accuracy", "accuracy", ".2%"), ("loss", "loss", ".4f"))
  panels = ("accuracy",)

  def loss(self, logits, labels, label_smoothing=0.0):
    return losses.softmax_cross_entropy(logits, labels, label_smoothing)

  def train_metrics(self, logits, labels):
    metrics = {"accuracy": metrics_lib.accuracy(logits, labels).mean()}
    if logits.shape[-1] > self.top_k:
      metrics[f"top{self.top_k}"] = metrics_lib.top_k_accuracy(logits, labels, self.top_k).mean()
    return metrics

  def sum_shapes(self, outputs):
    return {name: () for name in (["loss", "accuracy"]
                                  + ([f"top{self.top_k}"] if outputs > self.top_k else []) + ["count"])}

  def eval_sums(self, logits, labels, mask):
    sums = {"loss": (losses.softmax_cross_entropy(logits, labels) * mask).sum(),
            "accuracy": (metrics_lib.accuracy(logits, labels) * mask).sum(),
            "count": mask.sum()}
    if logits.shape[-1] > self.top_k:
      sums[f"top{self.top_k}"] = (metrics_lib.top_k_accuracy(logits, labels, self.top_k) * mask).sum()
    return sums, {}


@dataclasses.dataclass(frozen=True)
class Sigmoid(Head):
  """Two classes as one logit x, p(class 1) = sigmoid(x): the notes' logistic output."""
  name = "sigmoid"
  best = ("loss", "min")  # why not ROC AUC: the module docstring
  primary = "roc_auc"
  shown = (("loss", "loss", ".4f"), ("accuracy", "acc", ".2%"), ("roc_auc", "auc", ".4f"))
  final = (("accuracy", "accuracy", ".2%"), ("roc_auc", "ROC AUC", ".4f"), ("loss", "loss", ".4f"))
  panels = ("accuracy", "roc_auc")

  def outputs(self, num_classes):
    return 1

  def fits(self, label_type, num_classes):
    return label_type == "class" and num_classes == 2

  def loss(self, logits, labels, label_smoothing=0.0):
    logit = jnp.asarray(logits, jnp.float32)[:, 0]  # (B,)
    return losses.binary_cross_entropy(logit, _smooth_binary(labels, label_smoothing))

  @staticmethod
  def _hits(logits, labels):
    return ((logits[:, 0] > 0) == (labels > 0)).astype(jnp.float32)  # (B,): p > 1/2 is class 1

  def train_metrics(self, logits, labels):
    return {"accuracy": self._hits(logits, labels).mean()}

  def sum_shapes(self, outputs):
    return {"loss": (), "accuracy": (), "count": ()}

  def eval_sums(self, logits, labels, mask):
    sums = {"loss": (self.loss(logits, labels) * mask).sum(),
            "accuracy": (self._hits(logits, labels) * mask).sum(), "count": mask.sum()}
    # Logits, not probabilities: sigmoid rounds confident scores to 1.0 in float32, tying them.
    return sums, {"scores": jnp.asarray(logits, jnp.float32)[:, 0]}

  def finish(self, sums, gathered, labels, mask, replicas=0):
    if replicas:
      raise ValueError("the sigmoid head evaluates one replica")  # config.validate says so first
    metrics = _means(dict(sums), replicas)
    real = np.asarray(mask).reshape(-1) > 0
    scores = np.concatenate([g["scores"].reshape(-1) for g in gathered])[real]
    auc = roc_auc(scores, np.asarray(labels).reshape(-1)[real])
    if auc is not None:  # one class only: left out, not NaN (a row with a NaN is never the best)
      metrics["roc_auc"] = auc
    return metrics


@dataclasses.dataclass(frozen=True)
class MultiLabel(Head):
  """C independent logistic outputs, one per label (which need not be exclusive)."""
  name = "multilabel"
  best = ("f1", "max")
  primary = "f1"
  shown = (("loss", "loss", ".4f"), ("exact_match", "exact", ".2%"), ("f1", "f1", ".4f"))
  final = (("f1", "mean F1", ".4f"), ("exact_match", "exact match", ".2%"), ("loss", "loss", ".4f"))
  panels = ("f1", "exact_match")
  label_types = ("multi_hot",)

  def loss(self, logits, labels, label_smoothing=0.0):
    logits = jnp.asarray(logits, jnp.float32)  # (B, C)
    return losses.binary_cross_entropy(logits, _smooth_binary(labels, label_smoothing))  # mean over labels

  @staticmethod
  def _predicted(logits, labels):
    return logits > 0, jnp.asarray(labels) > 0  # (B, C) bools: p > 1/2, truth

  def train_metrics(self, logits, labels):
    pred, true = self._predicted(logits, labels)
    return {"exact_match": jnp.all(pred == true, axis=-1).astype(jnp.float32).mean()}

  def sum_shapes(self, outputs):
    return {"loss": (), "exact_match": (), "tp": (outputs,), "fp": (outputs,), "fn": (outputs,),
            "count": ()}

  def eval_sums(self, logits, labels, mask):
    pred, true = self._predicted(logits, labels)
    weight = mask[:, None]  # (B, 1): padding counts nowhere
    count = lambda x: (x.astype(jnp.float32) * weight).sum(0)  # (C,)
    sums = {"loss": (self.loss(logits, labels) * mask).sum(),
            "exact_match": (jnp.all(pred == true, axis=-1).astype(jnp.float32) * mask).sum(),
            "tp": count(pred & true), "fp": count(pred & ~true), "fn": count(~pred & true),
            "count": mask.sum()}
    return sums, {}

  def finish(self, sums, gathered, labels, mask, replicas=0):
    if replicas:
      raise ValueError("the multilabel head evaluates one replica")
    sums = dict(sums)
    f1 = f1_scores(sums.pop("tp"), sums.pop("fp"), sums.pop("fn"))
    return {**_means(sums, replicas), "f1": float(f1.mean()), "f1_per_label": f1.tolist()}


@dataclasses.dataclass(frozen=True)
class Regression(Head):
  """One linear output fitted to a real target.

  The step sees targets standardised by the training split, z = (y - mean) / std
  (`with_stats`, `encode`), so a freshly initialised output starts near the
  mean whatever the target's units; the loss (MSE or MAE) is in those standard
  units. RMSE and MAE are reported in the target's own units, R^2 (1 - SSE/SST
  about the split's own mean, as sklearn's r2_score) has none.
  """
  name = "regression"
  regression_loss: str = "mse"
  target_mean: float = 0.0
  target_std: float = 1.0
  best = ("rmse", "min")
  primary = "rmse"
  shown = (("loss", "loss", ".4f"), ("rmse", "rmse", ".4g"), ("mae", "mae", ".4g"), ("r2", "r2", ".4f"))
  final = (("rmse", "RMSE", ".4g"), ("mae", "MAE", ".4g"), ("r2", "R^2", ".4f"), ("loss", "loss", ".4f"))
  panels = ("rmse", "r2")
  label_types = ("value",)

  def outputs(self, num_classes):
    return 1

  def fits(self, label_type, num_classes):
    return label_type == "value" and num_classes == 1

  def with_stats(self, train_labels):
    y = np.asarray(train_labels, np.float64)
    return dataclasses.replace(self, target_mean=float(y.mean()), target_std=float(max(y.std(), 1e-12)))

  def encode(self, split):
    inputs, y = split
    return inputs, ((np.asarray(y, np.float64) - self.target_mean) / self.target_std).astype(np.float32)

  def record(self):
    return {"target_mean": self.target_mean, "target_std": self.target_std}

  def loss(self, logits, labels, label_smoothing=0.0):
    prediction = jnp.asarray(logits, jnp.float32)[:, 0]  # (B,)
    if self.regression_loss == "mae":
      return jnp.abs(prediction - jnp.asarray(labels, jnp.float32))
    return losses.mean_squared_error(prediction, labels)  # error^2 (optax.l2_loss would halve it)

  def sum_shapes(self, outputs):
    return {name: () for name in ("loss", "se", "ae", "y", "y2", "count")}

  def eval_sums(self, logits, labels, mask):
    y = jnp.asarray(labels, jnp.float32)
    error = jnp.asarray(logits, jnp.float32)[:, 0] - y
    sums = {"loss": (self.loss(logits, labels) * mask).sum(), "se": (error ** 2 * mask).sum(),
            "ae": (jnp.abs(error) * mask).sum(), "y": (y * mask).sum(), "y2": (y ** 2 * mask).sum(),
            "count": mask.sum()}
    return sums, {}

  def finish(self, sums, gathered, labels, mask, replicas=0):
    if replicas:
      raise ValueError("the regression head evaluates one replica")
    s = {k: float(v) for k, v in sums.items()}
    n = max(s["count"], 1.0)
    total = s["y2"] - s["y"] ** 2 / n  # sum (y - mean y)^2 over the split, in standard units
    return {"loss": s["loss"] / n, "rmse": float(np.sqrt(s["se"] / n)) * self.target_std,
            "mae": s["ae"] / n * self.target_std,
            "r2": 1.0 - s["se"] / total if total > 0 else float("nan")}


HEADS = Registry("head")
for _head in (Softmax, Sigmoid, MultiLabel, Regression):
  HEADS.register(_head.name, _head)

REGRESSION_LOSSES = ("mse", "mae")

# What each head needs, for `check`'s errors.
_NEEDS = {"softmax": "class labels", "sigmoid": "two classes (labels 0/1)",
          "multilabel": "multi-hot labels (N, C)", "regression": "one real-valued target per example"}


def check(head: str, label_type: str, num_classes: int, dataset: str) -> None:
  """ConfigError (one line) unless `head` can learn `dataset`'s labels.

  Arguments:
    head: a head name.
    label_type, num_classes: the dataset's (`Dataset.label_type`, `num_classes`).
    dataset: its name, for the message.
  """
  if HEADS.lookup(head)().fits(label_type, num_classes):
    return
  has = {"class": f"{num_classes} classes", "multi_hot": f"multi-hot labels over {num_classes}",
         "value": "real-valued targets"}.get(label_type, f"labels of type {label_type!r}")
  fitting = [name for name in HEADS if HEADS.lookup(name)().fits(label_type, num_classes)]
  use = f"use --head={' or --head='.join(fitting)}" if fitting else "no head fits them"
  raise ConfigError(f"--head={head} needs {_NEEDS[head]}; {dataset} has {has}: {use}")


def from_config(config, top_k: int = 5) -> Head:
  """The head a TrainConfig names (`config.head`, `config.regression_loss`)."""
  cls = HEADS.lookup(config.head)
  if cls is Softmax:
    return Softmax(top_k=top_k)
  if cls is Regression:
    return Regression(regression_loss=config.regression_loss)
  return cls()


def format_metrics(metrics: dict, shown: Shown, prefix: str = "") -> str:
  """'loss 0.1234 acc 95.00%': the `shown` metrics present in `metrics` (keys prefix + name)."""
  return " ".join(f"{label} {metrics[prefix + key]:{fmt}}" for key, label, fmt in shown
                  if prefix + key in metrics)
