"""How good a GAN's samples are: the Fréchet distance in a classifier's
feature space, and how a conditional generator uses its label.

  frechet_distance    distance between Gaussians fitted to two feature sets.
  Scorer, train_scorer
                      a jdl classifier (restored or trained) that gives
                      features and labels of images.
  sample_quality      the Fréchet distance of samples against real images.
  label_report        the confusion of asked-for and recognised classes.
"""
import dataclasses
import os
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jdl import xla
from jdl.data import pipeline
from jdl.errors import ConfigError
from jdl.gan.config import GANConfig
from jdl.gan.step import GANState, generate


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  """Square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
  values, vectors = np.linalg.eigh(matrix)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))[None, :]) @ vectors.T


def frechet_distance(features_a, features_b) -> float:
  """Fréchet distance between Gaussians fitted to two feature sets.

      d² = ||mu_a - mu_b||² + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})

  with means mu and covariances S (unbiased, N - 1). Computed in float64:
  Tr((S_a S_b)^{1/2}) = Tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}), a symmetric PSD
  matrix whose square root comes from its eigenvalues, so there is no complex
  round-off to discard (scipy.linalg.sqrtm of S_a S_b agrees to ~1e-10).

  With features from Inception-v3's pool layer this is FID (Heusel et al.
  2017). With features from a jdl classifier (e.g. its 'pre_logits') it is a
  useful relative measure between models scored by the SAME feature network,
  but NOT comparable with published, Inception-based FID values.

  Arguments:
    features_a: (N, D) features of one sample, N >= 2.
    features_b: (M, D) features of the other, M >= 2.
  Returns:
    The squared distance d² (>= 0) as a Python float, as FID reports it.
  """
  a = np.asarray(features_a, np.float64)
  b = np.asarray(features_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
    raise ConfigError(f'frechet_distance needs (N, D) and (M, D) features with N, M >= 2, '
                      f'got {a.shape} and {b.shape}')
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # (D, D) each
  cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
  sqrt_a = _sqrt_psd(cov_a)
  middle = sqrt_a @ cov_b @ sqrt_a
  middle = (middle + middle.T) / 2  # symmetric up to round-off
  trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0.0, None)).sum()
  distance = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
  return float(max(distance, 0.0))


class Scorer:
  """A trained jdl classifier that scores images: features for the Fréchet distance, labels.

  Images go through exactly the classifier's input path (uint8, then its
  training mean/std), so generated images in [-1, 1] are first rounded to uint8
  like real ones.
  """

  def __init__(self, state, mean, std):
    self.state = state

    @xla.jit
    def apply(state, images):
      if images.dtype != jnp.uint8:  # [-1, 1] floats -> the uint8 a PNG would hold
        images = jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
      variables = {"params": state.params}
      if state.batch_stats is not None:
        variables["batch_stats"] = state.batch_stats
      logits, features = state.apply_fn(variables, pipeline.normalize(images, mean, std), train=False)
      return features["pre_logits"], jnp.argmax(logits, -1)
    self._apply = apply

  def __call__(self, images, batch_size: int = 500) -> Tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, predicted labels (N,)) of images (N, H, W, C)."""
    out = [self._apply(self.state, images[i:i + batch_size])
           for i in range(0, len(images), batch_size)]
    return (np.concatenate([np.asarray(f) for f, _ in out]),
            np.concatenate([np.asarray(p) for _, p in out]))


def train_scorer(config: GANConfig, dataset, workdir: str, log=print,
                 devices=None) -> Tuple[Scorer, float]:
  """The scoring classifier: restored from --classifier_workdir or trained (cnn).

  Returns (scorer, its test accuracy).
  """
  from jdl import train
  from jdl.config import TrainConfig, load_run_config, recipe_for
  from jdl.data import split_validation
  # Batch 128 as experiments.cifar, fewer for tiny training sets (>= 2 steps an epoch).
  # Augmentation and a cosine schedule: on shapes_plain 30 such epochs give a
  # cnn 94.5% test accuracy against 79.6% for 8 plain ones (BUILD_NOTES.md),
  # and a scorer that misreads real images misreads samples too.
  # A dataset with a training recipe (jdl.config.RECIPES) is trained by it
  # instead, without augmentation: Fashion-MNIST's gives the cnn 92.1% in 20
  # epochs; --classifier_epochs still sets the epochs.
  devices = list(devices) if devices is not None else jax.devices()
  batch_size = max(1, min(128, int(len(dataset.train[1]) * 0.9) // 2))
  if batch_size >= len(devices):  # a multiple of the device count, to be data parallel
    batch_size -= batch_size % len(devices)
  cnn_config = TrainConfig(dataset=config.dataset, data_dir=config.data_dir, model="cnn",
                           epochs=config.classifier_epochs, num_train=config.num_train,
                           batch_size=batch_size, augment=True, schedule="cosine",
                           seed=config.seed, workdir=config.classifier_workdir or os.path.join(workdir, "classifier"))
  recipe = recipe_for(config.dataset, "cnn")
  if recipe:
    cnn_config = dataclasses.replace(cnn_config, **{**recipe, "augment": False,
                                                    "epochs": config.classifier_epochs})
  if config.classifier_workdir:
    cnn_config, _ = load_run_config(config.classifier_workdir, "classifier_workdir")
    if cnn_config.dataset != config.dataset:
      raise ConfigError(f"--classifier_workdir {config.classifier_workdir} was trained on "
                        f"{cnn_config.dataset!r}, not {config.dataset!r}")
    # Its own directory wherever it now lies; a finished run only re-evaluates.
    cnn_config = dataclasses.replace(cnn_config, workdir=config.classifier_workdir)
  log(f"Scoring classifier: {cnn_config.model} in {cnn_config.workdir}")
  if cnn_config.batch_size % len(devices):  # a stored or tiny batch: one device
    devices = devices[:1]
  state, results = train.fit(cnn_config, dataset, devices=devices, log=lambda line: None)
  train_split, _ = split_validation(dataset.train, cnn_config.validation_fraction, cnn_config.seed)
  mean, std = pipeline.channel_stats(train_split[0])  # as jdl.train normalised its inputs
  return Scorer(state, mean, std), results["test_accuracy"]


def sample_quality(state: GANState, scorer: Scorer, real_features, key, count: int,
                   num_classes: int) -> Dict[str, float]:
  """Fréchet distance (classifier features) of `count` samples vs real test images.

  For a conditional GAN also the rate at which the classifier labels a sample
  with the class it was asked for.
  """
  z_key, label_key = jax.random.split(key)
  z = jax.random.normal(z_key, (count, state.latent_dim))
  labels = jax.random.randint(label_key, (count,), 0, max(num_classes, 1))
  images = np.concatenate([np.asarray(generate(state, z[i:i + 500],
                                               labels[i:i + 500] if state.num_classes else None))
                           for i in range(0, count, 500)])
  features, predicted = scorer(images)
  out = {"frechet_distance": frechet_distance(real_features, features)}
  if state.num_classes:
    out["label_match_rate"] = float(np.mean(predicted == np.asarray(labels)))
  return out


def label_report(state: GANState, scorer: Scorer, key, per_class: int = 200) -> Dict[str, Any]:
  """How a conditional generator uses its label.

  Every class is generated from the same `per_class` latent vectors, so the
  K sets of images differ only by the label.

  Returns:
    confusion: (K, K) counts as nested lists: row = the class asked for,
      column = the scoring classifier's label.
    match_rate: the confusion matrix's trace over its total.
    label_effect: mean |G(z, a) - G(z, b)| over class pairs a < b (pixels
      in [-1, 1]): how far another label moves an image.
    noise_effect: mean |G(z1, c) - G(z2, c)| between two halves of the z's:
      how far another z moves it. A label_effect far below noise_effect means
      the generator all but ignores its label.
  """
  num_classes = state.num_classes
  z = jax.random.normal(key, (per_class, state.latent_dim))
  images = np.stack([np.asarray(generate(state, z, jnp.full((per_class,), c, jnp.int32)))
                     for c in range(num_classes)])  # (K, per_class, H, W, C)
  confusion = np.stack([np.bincount(scorer(images[c])[1], minlength=num_classes)
                        for c in range(num_classes)])
  half = per_class // 2
  return {"confusion": confusion.tolist(),
          "match_rate": float(np.trace(confusion) / confusion.sum()),
          "label_effect": float(np.mean([np.abs(images[a] - images[b]).mean()
                                         for a in range(num_classes) for b in range(a + 1, num_classes)])),
          "noise_effect": float(np.abs(images[:, :half] - images[:, half:2 * half]).mean())}
