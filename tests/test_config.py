"""Config validation: every bad value or combination is a one-line ConfigError."""
import dataclasses

import pytest

from jdl.config import PRESETS, TrainConfig, apply_preset, validate
from jdl.errors import ConfigError

BAD = [
    (dict(model="resnet99"), "unknown model 'resnet99'; choose one of: .*cnn"),
    (dict(optimizer="adamax"), "unknown optimizer 'adamax'; choose one of: .*rmsprop"),
    (dict(schedule="sawtooth"), "unknown schedule 'sawtooth'; choose one of: .*cosine"),
    (dict(activation="swish2"), "unknown activation 'swish2'; choose one of: .*relu"),
    (dict(learning_rate=0.0), "learning_rate must be > 0"),
    (dict(learning_rate=-1e-3), "learning_rate must be > 0"),
    (dict(learning_rate=float("nan")), "learning_rate must be > 0"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(epochs=-1), "epochs must be >= 0"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    (dict(validation_fraction=1.0), "validation_fraction"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(weight_decay=-1.0), "weight_decay must be >= 0"),
    (dict(l1=-0.1), "l1 must be >= 0"),
    (dict(l2=-0.1), "l2 must be >= 0"),
    (dict(clip_norm=-1.0), "clip_norm must be >= 0"),
    (dict(momentum=1.0), "momentum"),
    (dict(decay_rate=0.0), "decay_rate must be > 0"),
    (dict(boundaries=(0.75, 0.5)), "boundaries must be increasing"),
    (dict(boundaries=(0.5, 1.5)), "boundaries"),
    (dict(precision="float16"), "precision must be float32 or bfloat16"),
    (dict(keep_checkpoints=0), "keep_checkpoints"),
    (dict(early_stopping_patience=-2), "early_stopping_patience must be >= 0"),
    (dict(early_stopping_patience=3, validation_fraction=0.0), "needs a validation split"),
    (dict(model="resnet20", dropout=0.5), "--dropout does not apply to model 'resnet20'"),
    (dict(num_train=-5), "num_train must be >= 0"),
]


@pytest.mark.parametrize("overrides,pattern", BAD, ids=[str(o) for o, _ in BAD])
def test_bad_config_is_one_line_error(overrides, pattern):
  config = dataclasses.replace(TrainConfig(dataset="shapes"), **overrides)
  with pytest.raises(ConfigError, match=pattern) as e:
    validate(config)
  assert "\n" not in str(e.value)


def test_defaults_are_valid():
  validate(TrainConfig())
  for name in PRESETS:
    validate(apply_preset(TrainConfig(), name))


def test_preset_keeps_explicit_flags():
  config = apply_preset(TrainConfig(epochs=3), "keras_cnn_augment", explicit={"epochs"})
  assert (config.model, config.optimizer, config.batch_size, config.augment) == ("cnn", "rmsprop", 32, True)
  assert config.epochs == 3
  with pytest.raises(ConfigError, match="unknown preset 'keras'"):
    apply_preset(TrainConfig(), "keras")


def test_dataset_recipes_fill_what_the_user_did_not_set():
  # Fashion-MNIST: 20 cosine epochs on all 60,000 images; the recurrent models at Adam 1e-3.
  config = apply_preset(TrainConfig(dataset="fashion_mnist", model="gru", learning_rate=1e-2), "")
  assert (config.epochs, config.schedule, config.validation_fraction, config.learning_rate) == (
      20, "cosine", 0.0, 1e-3)
  assert apply_preset(TrainConfig(dataset="fashion_mnist", model="cnn"), "").learning_rate == 1e-3
  # The slow ImageNet families train for the epochs behind their figures.
  for model, epochs in (("alexnet", 5), ("googlenet", 3), ("vgg16", 20)):
    config = apply_preset(TrainConfig(dataset="fashion_mnist", model=model), "")
    assert (config.epochs, config.schedule, config.validation_fraction) == (epochs, "cosine", 0.0)
  # Explicit flags win over the recipe; a preset replaces it.
  config = apply_preset(TrainConfig(dataset="fashion_mnist", model="lstm", epochs=5, learning_rate=0.1),
                        "", explicit={"epochs", "learning_rate"})
  assert (config.epochs, config.learning_rate, config.schedule) == (5, 0.1, "cosine")
  config = apply_preset(TrainConfig(dataset="fashion_mnist"), "keras_cnn")
  assert (config.epochs, config.validation_fraction) == (100, TrainConfig().validation_fraction)
  # MNIST-1D: cnn1d gets its dropout, other models and datasets nothing.
  assert apply_preset(TrainConfig(dataset="mnist1d", model="cnn1d"), "").dropout == 0.3
  assert apply_preset(TrainConfig(dataset="mnist1d", model="gru"), "") == TrainConfig(dataset="mnist1d",
                                                                                      model="gru")
  assert apply_preset(TrainConfig(dataset="cifar10"), "") == TrainConfig(dataset="cifar10")
