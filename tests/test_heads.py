"""The heads beyond softmax (jdl.heads): losses and metrics against NumPy, their
datasets, their config errors, and one short training run per head through
`jdl.train.fit` that must pass a stated bar."""
import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdl import heads, train
from jdl.config import PRESETS, TrainConfig, apply_preset, validate
from jdl.data import KNOWN_LABELS, Dataset, classic, load_dataset, pipeline
from jdl.data import shapes as shapes_lib
from jdl.errors import ConfigError
from jdl.models import build_model


# ----------------------------------------------------------------------------
# NumPy references, written from the definitions.
# ----------------------------------------------------------------------------

def np_bce(x, z):
  """-[z log p + (1 - z) log(1 - p)], p = sigmoid(x), with log sigmoid(x) = -log(1 + e^-x)."""
  x, z = np.asarray(x, np.float64), np.asarray(z, np.float64)
  return z * np.logaddexp(0, -x) + (1 - z) * np.logaddexp(0, x)


def np_auc(scores, labels):
  """P(score of a positive > score of a negative) over every pair, ties counting 1/2."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
  diff = scores[labels == 1][:, None] - scores[labels == 0][None, :]
  return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def np_f1(pred, true):
  """Per-label F1 as the harmonic mean of precision and recall (0 where undefined)."""
  f1 = []
  for p, t in zip(pred.T, true.T):
    tp = np.sum(p & t)
    precision = tp / p.sum() if p.sum() else 0.0
    recall = tp / t.sum() if t.sum() else 0.0
    f1.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
  return np.array(f1)


def split_metrics(head, logits, labels, batch=16):
  """A split's metrics as `train.evaluate` computes them: padded batches (the
  padding filled with garbage that the mask must hide), summed, then finished."""
  n = len(labels)
  k = math.ceil(n / batch)
  pad = k * batch - n
  rng = np.random.default_rng(1)
  logits = np.concatenate([logits, 50 * rng.normal(size=(pad, *logits.shape[1:]))]).astype(np.float32)
  labels = np.concatenate([labels, np.ones((pad, *labels.shape[1:]), labels.dtype)])
  mask = (np.arange(k * batch) < n).astype(np.float32)
  sums = {name: jnp.zeros(shape, jnp.float32) for name, shape in head.sum_shapes(logits.shape[1]).items()}
  gathered = []
  for i in range(k):
    part = slice(i * batch, (i + 1) * batch)
    batch_sums, values = head.eval_sums(jnp.asarray(logits[part]), jnp.asarray(labels[part]),
                                        jnp.asarray(mask[part]))
    sums = jax.tree.map(jnp.add, sums, batch_sums)
    gathered.append(values)
  return head.finish(jax.device_get(sums), jax.device_get(gathered), labels, mask)


# ----------------------------------------------------------------------------
# Losses and metrics.
# ----------------------------------------------------------------------------

def test_sigmoid_loss_accuracy_and_roc_auc():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 45).astype(np.int32)
  logits = (rng.normal(size=(45, 1)) + labels[:, None]).astype(np.float32)
  logits[:4, 0] = [60.0, -60.0, 0.0, 0.0]  # saturated and tied scores
  head = heads.Sigmoid()
  np.testing.assert_allclose(head.loss(logits, labels), np_bce(logits[:, 0], labels), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(head.loss(logits, labels, 0.2),  # smoothed targets: 0.1 and 0.9
                             np_bce(logits[:, 0], 0.1 + 0.8 * labels), rtol=1e-5, atol=1e-6)
  accuracy = np.mean((logits[:, 0] > 0) == (labels == 1))
  np.testing.assert_allclose(head.train_metrics(jnp.asarray(logits), labels)["accuracy"], accuracy, rtol=1e-6)

  got = split_metrics(head, logits, labels)
  np.testing.assert_allclose(got["loss"], np_bce(logits[:, 0], labels).mean(), rtol=1e-5)
  np.testing.assert_allclose(got["accuracy"], accuracy, rtol=1e-6)
  np.testing.assert_allclose(got["roc_auc"], np_auc(logits[:, 0], labels), rtol=1e-12)


def test_roc_auc_with_ties_and_edge_cases():
  rng = np.random.default_rng(2)
  scores = rng.integers(0, 5, 200).astype(np.float32)  # many ties
  labels = (rng.random(200) < 0.3).astype(np.int32)
  assert heads.roc_auc(scores, labels) == pytest.approx(np_auc(scores, labels), abs=1e-12)
  assert heads.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)  # sklearn's docs example
  assert heads.roc_auc(scores, -scores > -2) == pytest.approx(np_auc(scores, -scores > -2))
  assert heads.roc_auc([1.0, 2.0], [1, 1]) is None  # one class: undefined, left out of the metrics


def test_multilabel_loss_exact_match_and_f1():
  rng = np.random.default_rng(3)
  labels = (rng.random((50, 6)) < 0.3).astype(np.int32)
  labels[:, 5] = 0  # a label never present...
  logits = (2 * rng.normal(size=(50, 6)) + 2 * labels - 1).astype(np.float32)
  logits[:, 5] = -1.0  # ...and never predicted: F1 0 (sklearn's zero_division=0)
  head = heads.MultiLabel()
  np.testing.assert_allclose(head.loss(logits, labels), np_bce(logits, labels).mean(1), rtol=1e-5)
  exact = np.mean(np.all((logits > 0) == (labels == 1), axis=1))
  np.testing.assert_allclose(head.train_metrics(jnp.asarray(logits), labels)["exact_match"], exact)

  got = split_metrics(head, logits, labels)
  f1 = np_f1(logits > 0, labels == 1)
  np.testing.assert_allclose(got["f1_per_label"], f1, rtol=1e-6)
  np.testing.assert_allclose(got["f1"], f1.mean(), rtol=1e-6)
  np.testing.assert_allclose(got["exact_match"], exact, rtol=1e-6)
  np.testing.assert_allclose(got["loss"], np_bce(logits, labels).mean(), rtol=1e-5)


@pytest.mark.parametrize("loss", ["mse", "mae"])
def test_regression_loss_rmse_mae_r2_in_target_units(loss):
  rng = np.random.default_rng(4)
  y = rng.uniform(6.4, 12.2, 70)  # pixels
  prediction = y + rng.normal(0, 0.7, 70)
  head = heads.Regression(regression_loss=loss).with_stats(y[:40])  # stats of a "training" part
  assert head.target_mean == pytest.approx(y[:40].mean()) and head.target_std == pytest.approx(y[:40].std())
  _, z = head.encode((None, y))
  z_hat = ((prediction - head.target_mean) / head.target_std).astype(np.float32)[:, None]  # (N, 1) output
  error = z_hat[:, 0] - z
  np.testing.assert_allclose(head.loss(z_hat, z), error ** 2 if loss == "mse" else np.abs(error),
                             rtol=1e-5, atol=1e-7)

  got = split_metrics(head, z_hat, z)
  r2 = 1 - np.sum((y - prediction) ** 2) / np.sum((y - y.mean()) ** 2)
  np.testing.assert_allclose(got["rmse"], np.sqrt(np.mean((y - prediction) ** 2)), rtol=1e-4)
  np.testing.assert_allclose(got["mae"], np.mean(np.abs(y - prediction)), rtol=1e-4)
  np.testing.assert_allclose(got["r2"], r2, rtol=1e-4)


def test_softmax_head_is_todays_classifier():
  rng = np.random.default_rng(5)
  logits, labels = rng.normal(size=(20, 7)).astype(np.float32), rng.integers(0, 7, 20).astype(np.int32)
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  targets = 0.9 * np.eye(7)[labels] + 0.1 / 7
  np.testing.assert_allclose(heads.Softmax().loss(logits, labels, 0.1), -(targets * log_p).sum(1), rtol=1e-5)
  assert list(heads.Softmax().sum_shapes(7)) == train.eval_names(7) == ["loss", "accuracy", "top5", "count"]
  got = split_metrics(heads.Softmax(), logits, labels)
  np.testing.assert_allclose(got["accuracy"], np.mean(logits.argmax(1) == labels))
  np.testing.assert_allclose(got["loss"], -log_p[np.arange(20), labels].mean(), rtol=1e-5)


# ----------------------------------------------------------------------------
# Datasets.
# ----------------------------------------------------------------------------

def test_shapes_multilabel():
  data = load_dataset("shapes_multilabel", num_train=300, num_test=50, seed=3)
  images, labels = data.train
  assert images.shape == (300, 32, 32, 3) and images.dtype == np.uint8
  assert labels.shape == (300, 10) and labels.dtype == np.int32 and set(np.unique(labels)) == {0, 1}
  assert sorted(set(labels.sum(1))) == [1, 2, 3]  # 1-3 shapes of distinct classes
  assert (data.label_type, data.num_classes, data.class_names) == ("multi_hot", 10, shapes_lib.CLASS_NAMES)
  again = load_dataset("shapes_multilabel", num_train=300, num_test=50, seed=3)
  np.testing.assert_array_equal(again.train[0], images)
  np.testing.assert_array_equal(again.train[1], labels)


def test_shapes_size():
  data = load_dataset("shapes_size", num_train=200, num_test=50, seed=4)
  images, radius = data.train
  assert radius.shape == (200,) and radius.dtype == np.float32
  low, high = (s * 32 for s in shapes_lib.SCALE_RANGE)
  assert low <= radius.min() and radius.max() <= high and radius.std() > 1.0  # pixels
  assert (data.label_type, data.num_classes) == ("value", 1)
  # The same images as `shapes_plain` with that seed: the target is the size of its shape.
  plain = load_dataset("shapes_plain", num_train=200, num_test=50, seed=4).train[0]
  np.testing.assert_array_equal(images, plain)


def test_known_labels_match_the_loaded_datasets():
  for name in ("shapes", "shapes_plain", "shapes_multilabel", "shapes_size"):
    data = load_dataset(name, num_train=20, num_test=10)
    assert KNOWN_LABELS[name] == (data.label_type, data.num_classes), name


DEBIAN_FASHION = classic.DEBIAN_DIRS["fashion_mnist"]


@pytest.fixture(scope="module")
def footwear():
  if not os.path.isdir(DEBIAN_FASHION):
    message = f"{DEBIAN_FASHION} is missing: apt-get install dataset-fashion-mnist"
    if os.environ.get("CI"):
      pytest.fail(message + "; CI must run the real-data tests")
    pytest.skip(message)
  return load_dataset("fashion_mnist_footwear", data_dir=DEBIAN_FASHION, download=False)


def test_fashion_mnist_footwear(footwear):
  fashion = load_dataset("fashion_mnist", data_dir=DEBIAN_FASHION, download=False)
  for (x, y), (fx, fy) in ((footwear.train, fashion.train), (footwear.test, fashion.test)):
    np.testing.assert_array_equal(x, fx)
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, np.isin(fy, [5, 7, 9]))  # Sandal, Sneaker, Ankle boot
  assert footwear.train[1].mean() == pytest.approx(0.3) and footwear.test[1].mean() == pytest.approx(0.3)
  assert (footwear.label_type, footwear.num_classes) == ("class", 2) == KNOWN_LABELS["fashion_mnist_footwear"]
  assert footwear.class_names == ("not footwear", "footwear")


# ----------------------------------------------------------------------------
# Configuration: impossible combinations are one-line errors.
# ----------------------------------------------------------------------------

BAD = [
    (dict(head="sigmoid"), r"--head=sigmoid needs two classes .*shapes has 10 classes: use --head=softmax"),
    (dict(head="multilabel"), "--head=multilabel needs multi-hot labels"),
    (dict(head="logit"), "unknown head 'logit'; choose one of: multilabel, regression, sigmoid, softmax"),
    (dict(dataset="shapes_size"), "shapes_size has real-valued targets: use --head=regression"),
    (dict(dataset="shapes_multilabel", head="regression"), "use --head=multilabel"),
    (dict(dataset="shapes_size", head="regression", regression_loss="huber"), "regression_loss must be one of mse, mae"),
    (dict(dataset="shapes_size", head="regression", label_smoothing=0.1), "--label_smoothing smooths class labels"),
    (dict(dataset="shapes_size", head="regression", augment=True), "--augment with --head=regression"),
    (dict(dataset="fashion_mnist_footwear", head="sigmoid", num_seeds=2), "--num_seeds > 1 trains softmax heads only"),
]


@pytest.mark.parametrize("overrides,pattern", BAD, ids=[str(o) for o, _ in BAD])
def test_impossible_head_is_one_line_error(overrides, pattern):
  config = TrainConfig(**{"dataset": "shapes", **overrides})
  with pytest.raises(ConfigError, match=pattern) as e:
    validate(config)
  assert "\n" not in str(e.value)


def test_possible_heads_validate():
  for dataset, head in (("fashion_mnist_footwear", "sigmoid"), ("fashion_mnist_footwear", "softmax"),
                        ("shapes_multilabel", "multilabel"), ("shapes_size", "regression")):
    validate(TrainConfig(dataset=dataset, head=head))
  config = apply_preset(TrainConfig(), "logistic_regression")
  validate(config)
  assert (config.model, config.head, config.dataset) == ("logistic", "sigmoid", "fashion_mnist_footwear")


def test_data_in_memory_is_checked_when_loaded():
  images = np.zeros((40, 8, 8, 1), np.uint8)
  mine = Dataset("mine", (images, np.arange(40, dtype=np.int32) % 3), (images, np.zeros(40, np.int32)),
                 3, ("a", "b", "c"))
  with pytest.raises(ConfigError, match="--head=sigmoid needs two classes .*mine has 3 classes"):
    train.load_splits(TrainConfig(dataset="mine", head="sigmoid", batch_size=8), mine)


# ----------------------------------------------------------------------------
# One short training run per head, through the classifier task's one loop.
# ----------------------------------------------------------------------------

def _fit(tmp_path, config, dataset, model=None):
  return train.fit(dataclasses.replace(config, workdir=str(tmp_path / "run"), log_every=1000), dataset,
                   model=model, progress=False, log=lambda *a: None)


def _rows(tmp_path):
  return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def _cnn(outputs):
  """jdl's cnn with 3x3 kernels and no dropout: learns these small sets in a few epochs."""
  return build_model("cnn", kernel_size=3, dropout=0.0, head_dropout=0.0, num_classes=outputs)


def run_logistic_regression(tmp_path, footwear, seed=0):
  """The preset on 3,000 training images (2,400 after validation), 2 epochs."""
  data = dataclasses.replace(footwear, train=tuple(a[:3000] for a in footwear.train),
                             test=tuple(a[:1000] for a in footwear.test))
  config = apply_preset(TrainConfig(epochs=2, validation_fraction=0.2, seed=seed), "logistic_regression",
                        explicit={"epochs", "validation_fraction", "seed"})
  return config, data, _fit(tmp_path, config, data)


def run_multilabel(tmp_path, seed=0):
  data = load_dataset("shapes_multilabel", num_train=3000, num_test=300, seed=0)
  config = TrainConfig(dataset="shapes_multilabel", head="multilabel", batch_size=32, epochs=8,
                       learning_rate=3e-3, validation_fraction=0.2, seed=seed)
  return _fit(tmp_path, config, data, _cnn(10))


def run_regression(tmp_path, seed=0):
  data = load_dataset("shapes_size", num_train=2000, num_test=300, seed=0)
  config = TrainConfig(dataset="shapes_size", head="regression", batch_size=32, epochs=4,
                       learning_rate=3e-3, validation_fraction=0.2, seed=seed)
  return _fit(tmp_path, config, data, _cnn(1))


def test_logistic_regression_on_footwear(tmp_path, footwear):
  """One Dense unit, sigmoid, BCE. Always saying 'not footwear' scores 70% accuracy, AUC 0.5.
  Measured: accuracy 99.3% / 99.2%, ROC AUC 0.9998 / 0.9998 (seeds 0 / 1)."""
  config, data, (state, results) = run_logistic_regression(tmp_path, footwear)
  assert results["params_count"] == 28 * 28 + 1
  assert results["test_accuracy"] >= 0.97, results
  assert results["test_roc_auc"] >= 0.99, results
  assert results["best_val_loss"] == min(r["val_loss"] for r in _rows(tmp_path))
  # The gathered AUC equals the definition's on the returned model's test logits.
  _, _, _, (mean, std) = train.load_splits(config, data)
  logits, _ = state.apply_fn({"params": state.params}, pipeline.normalize(data.test[0], mean, std))
  assert results["test_roc_auc"] == pytest.approx(np_auc(np.asarray(logits)[:, 0], data.test[1]), abs=1e-6)


def test_multilabel_run_on_shapes(tmp_path):
  """Saying every label is present scores mean F1 0.33 (each is in 20% of the images);
  the best constant answer matches 3% of the images exactly. Measured: mean F1 0.65 / 0.62,
  exact match 35% / 29% (seeds 0 / 1)."""
  _, results = run_multilabel(tmp_path)
  assert len(results["test_f1_per_label"]) == 10
  assert results["test_f1"] >= 0.5, results
  assert results["test_exact_match"] >= 0.15, results
  assert results["best_val_f1"] == max(r["val_f1"] for r in _rows(tmp_path))


def test_regression_run_on_shapes_size(tmp_path):
  """Predicting the mean gives R^2 0 and RMSE 1.66 px (the radius is uniform on
  6.4-12.2 px). Measured: R^2 0.65 / 0.59, RMSE 0.97 / 1.06 px (seeds 0 / 1)."""
  _, results = run_regression(tmp_path)
  assert results["test_r2"] >= 0.4, results
  assert results["test_rmse"] <= 1.3, results  # pixels
  assert results["config"]["target_std"] == pytest.approx(1.66, abs=0.1)
  assert results["best_val_rmse"] == min(r["val_rmse"] for r in _rows(tmp_path))
