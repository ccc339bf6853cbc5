"""Training configuration: one dataclass, its presets and its validation.

`TrainConfig` is the single place where defaults live, each with its unit.
Experiment entrypoints generate their absl flags from it (`jdl.cli`), so the
flags, the library defaults and `results.json` never drift apart. `validate`
checks everything that can be checked without data or compilation and raises a
one-line `ConfigError`.
"""
import dataclasses
import math
import os
from typing import Optional, Tuple

from jdl.errors import ConfigError


def option(default, help: str):
  """A config dataclass field with its flag help text (see `jdl.cli.define_flags`)."""
  return dataclasses.field(default=default, metadata={"help": help})



def make_writable_dir(workdir: str) -> None:
  """Creates `workdir` if needed; ConfigError (one line) if it cannot be written."""
  import os
  import tempfile
  try:
    os.makedirs(workdir, exist_ok=True)
    # A probe of its own per process: the processes of a multi-host run share the workdir.
    handle, probe = tempfile.mkstemp(prefix=".write_test", dir=workdir)
    os.close(handle)
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"workdir {workdir} is not writable: {e.strerror}") from None


@dataclasses.dataclass
class TrainConfig:
  """Everything that defines a classification training run."""
  # --- data ---
  dataset: str = option("cifar10", "shapes, shapes_plain (built in, offline) or a TFDS image-classification dataset")
  data_dir: Optional[str] = option(None, "where TFDS data is looked for (TFDS default if unset)")
  num_train: int = option(0, "training examples: shapes generates this many, TFDS keeps the first N (0: default/all)")
  num_test: int = option(0, "test examples, as num_train (0: default/all)")
  validation_fraction: float = option(0.1, "fraction of the training split held out for validation")
  test_every_epoch: bool = option(False, "also score the test split after every epoch: a time-to-accuracy "
                                  "curve (test accuracy against training seconds); never used to choose "
                                  "a checkpoint")
  augment: bool = option(False, "augment training images on the device as the aug_* flags say (by default "
                         "shifts of up to 4 px filled with the mean colour, and horizontal flips)")
  # Keras ImageDataGenerator's transforms (jdl.data.augmentation); used with --augment only.
  aug_width_shift: float = option(4.0, "--augment: largest horizontal shift, a fraction of the width if < 1 "
                                  "(Keras width_shift_range), else whole pixels")
  aug_height_shift: float = option(4.0, "--augment: largest vertical shift, a fraction of the height if < 1, "
                                   "else whole pixels")
  aug_horizontal_flip: bool = option(True, "--augment: mirror left-right with probability 1/2")
  aug_vertical_flip: bool = option(False, "--augment: mirror up-down with probability 1/2")
  aug_rotation: float = option(0.0, "--augment: largest rotation, in degrees (nearest-neighbour sampling)")
  aug_fill_mode: str = option("constant", "--augment: what shifts and rotations read outside the image, as "
                              "Keras: constant (the mean colour), nearest, reflect (dcba|abcd) or wrap")
  aug_erase_prob: float = option(0.0, "--augment: probability of random erasing (one rectangle set to the "
                                 "mean colour), per image")
  aug_erase_area: Tuple[float, ...] = option((0.02, 0.33), "--augment: random erasing's (min, max) rectangle "
                                             "area, as fractions of the image")
  # --- model ---
  model: str = option("cnn", "model name (see jdl.models.MODELS)")
  activation: Optional[str] = option(None, "hidden activation by name (model default if unset)")
  dropout: Optional[float] = option(None, "dropout rate in [0, 1) (model default if unset)")
  hidden_size: Optional[int] = option(None, "recurrent models: units per layer and direction (model default if unset)")
  num_layers: Optional[int] = option(None, "recurrent models: stacked layers (model default if unset)")
  bidirectional: Optional[bool] = option(None, "recurrent models: also read the sequence backwards (model default if unset)")
  rnn_implementation: Optional[str] = option(None, "lstm models: scan (any backend) or cudnn (the cuDNN kernel: CUDA GPU, float32) (model default if unset)")
  precision: str = option("float32", "compute dtype: float32 or bfloat16 (parameters stay float32)")
  head: str = option("softmax", "the output and its loss (jdl.heads): softmax (one class of C: C logits, "
                     "cross-entropy), sigmoid (two classes: one logit, binary cross-entropy; accuracy and "
                     "ROC AUC), multilabel (multi-hot labels: a logit per label, per-label binary "
                     "cross-entropy; per-label F1 and exact match) or regression (a real target: one "
                     "linear output, --regression_loss; RMSE, MAE, R^2)")
  regression_loss: str = option("mse", "--head=regression: mse (mean squared error) or mae (mean absolute "
                                "error), on targets standardised by the training split's mean and std")
  # --- optimisation ---
  optimizer: str = option("adam", "sgd, momentum, nesterov, adagrad, rmsprop, adam, adamw")
  learning_rate: float = option(1e-3, "peak learning rate, per step")
  momentum: float = option(0.9, "momentum for momentum/nesterov")
  schedule: str = option("constant", "constant, inverse_time, exponential, cosine, warmup_cosine, piecewise, one_cycle")
  decay_rate: float = option(0.5, "inverse_time/exponential: decay rate")
  decay_steps: int = option(0, "inverse_time/exponential: steps per decay unit (0: one epoch)")
  warmup_steps: int = option(0, "warmup_cosine/one_cycle: warm-up steps (0: 5% of training)")
  boundaries: Tuple[float, ...] = option((0.5, 0.75), "piecewise: boundaries as fractions of training")
  boundary_scale: float = option(0.1, "piecewise: learning-rate factor at each boundary")
  clip_norm: float = option(0.0, "clip gradients to this global norm (0: off)")
  weight_decay: float = option(0.0, "decoupled weight decay on kernels, per step x learning rate")
  l1: float = option(0.0, "L1 penalty coefficient on kernels, added to the loss")
  l2: float = option(0.0, "L2 penalty coefficient on kernels, added to the loss")
  label_smoothing: float = option(0.0, "label smoothing epsilon in [0, 1) (sigmoid and multilabel heads: "
                                  "targets move eps/2 towards 1/2)")
  epochs: int = option(10, "passes over the training split")
  batch_size: int = option(128, "examples per training step")
  early_stopping_patience: int = option(0, "stop after this many epochs without a better validation metric "
                                        "(the head's: accuracy for softmax, loss for sigmoid, mean F1 for "
                                        "multilabel, RMSE for regression) (0: off)")
  nan_policy: str = option("stop", "on a non-finite loss or gradient: stop (with a message naming the step) "
                           "or skip (leave the state unchanged for that step and count it)")
  # --- run ---
  seed: int = option(0, "seed of initialisation, data order, augmentation and dropout")
  num_seeds: int = option(1, "train this many replicas (seeds seed..seed+N-1, same data) in one vmapped "
                          "program and report mean ± std")
  workdir: Optional[str] = option(None, "checkpoints, metrics and plots go here; rerunning resumes (default runs/DATASET-MODEL-seedS)")
  keep_checkpoints: int = option(2, "latest checkpoints kept for resume (the best is kept separately)")
  log_every: int = option(50, "steps between progress-bar loss updates (each is a device sync)")
  download: bool = option(True, "allow TFDS to download and prepare a dataset that is not there")


# The course notes' three Keras CIFAR-10 examples (Udacity AIND, cifar10_mlp /
# cifar10_cnn / cifar10_augmentation): RMSprop with Keras defaults, batch 32,
# categorical cross-entropy, the best-validation checkpoint reloaded for test.
PRESETS = {
    "keras_mlp": dict(model="mlp", optimizer="rmsprop", learning_rate=1e-3,
                      batch_size=32, epochs=20, augment=False),
    "keras_cnn": dict(model="cnn", optimizer="rmsprop", learning_rate=1e-3,
                      batch_size=32, epochs=100, augment=False),
    # ImageDataGenerator(width_shift_range=0.1, height_shift_range=0.1,
    # horizontal_flip=True), with Keras's default fill_mode='nearest'.
    "keras_cnn_augment": dict(model="cnn", optimizer="rmsprop", learning_rate=1e-3,
                              batch_size=32, epochs=100, augment=True, aug_width_shift=0.1,
                              aug_height_shift=0.1, aug_fill_mode="nearest"),
    # The notes' logistic regression (003): one Dense unit, a sigmoid, binary
    # cross-entropy; here footwear vs the rest of Fashion-MNIST.
    "logistic_regression": dict(model="logistic", head="sigmoid", dataset="fashion_mnist_footwear",
                                optimizer="sgd", learning_rate=0.1, batch_size=32, epochs=5),
}


# The defaults that reach BUILD_NOTES.md's figures on a dataset, for the
# fields a run does not set (experiments.cifar and sequence apply them when no
# --preset is given; a library caller builds its TrainConfig itself). Keyed by
# dataset, then optionally by model: Fashion-MNIST is trained, as its published
# table was, on all 60,000 training images (no validation split, the last
# epoch's model tested), for 20 epochs of a cosine schedule.
RECIPES = {
    # The recurrent models diverge at experiments.sequence's Adam 1e-2 here.
    # AlexNet and GoogLeNet default to the epochs behind their recorded figures
    # (BUILD_NOTES 3.13): 20 would take them hours on a CPU.
    "fashion_mnist": dict(epochs=20, schedule="cosine", validation_fraction=0.0,
                          gru=dict(learning_rate=1e-3), lstm=dict(learning_rate=1e-3),
                          alexnet=dict(epochs=5), googlenet=dict(epochs=3)),
    # MNIST-1D: cnn1d overfits without dropout (92.2% vs 94.6%); logistic is
    # trained on all 4,000 as in the paper.
    "mnist1d": dict(cnn1d=dict(dropout=0.3), logistic=dict(validation_fraction=0.0)),
}


def recipe_for(dataset: str, model: str) -> dict:
  """The recipe's field values for `model` on `dataset` ({} for none)."""
  recipe = RECIPES.get(dataset, {})
  return {**{k: v for k, v in recipe.items() if not isinstance(v, dict)},
          **recipe.get(model, {})}


def apply_preset(config: TrainConfig, preset: str, explicit=()) -> TrainConfig:
  """Returns `config` with `preset`'s values (or, without a preset, the recipe
  for its dataset and model), except fields named in `explicit`.

  Arguments:
    config: the starting configuration.
    preset: a name from PRESETS ('' for none: the dataset's recipe, if any).
    explicit: field names the user set explicitly; they win over both.
  """
  if not preset:
    values = recipe_for(config.dataset, config.model)
  elif preset not in PRESETS:
    raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
  else:
    values = PRESETS[preset]
  return dataclasses.replace(config, **{k: v for k, v in values.items() if k not in explicit})


def load_run_config(workdir: str, flag: str) -> Tuple[TrainConfig, dict]:
  """The TrainConfig of the experiments.cifar run in `workdir`, and its raw config.json.

  Arguments:
    workdir: the run's directory.
    flag: the flag that named it, for the one-line error (e.g. 'pretrained_workdir').
  """
  import json
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    saved = None
  if not isinstance(saved, dict) or "model" not in saved:
    raise ConfigError(f"--{flag} {workdir} holds no experiments.cifar run (no readable config.json)")
  if saved.get("task") != "classifier":
    what = f"a {saved['task']} run" if "task" in saved else "a run of an older jdl"
    raise ConfigError(f"--{flag} {workdir} holds {what}, not a classifier run of experiments.cifar "
                      "or experiments.sequence")
  known = {f.name for f in dataclasses.fields(TrainConfig)}
  config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in saved.items() if k in known})
  return config, saved


def validate(config: TrainConfig) -> None:
  """Raises ConfigError (one line) for any bad value or combination.

  Checks names against the registries and numbers against their ranges; checks
  that need the data (batch size vs training-set size) happen in `jdl.train`.
  """
  from jdl import activations, models, optim  # Registries; imported late to keep this module light.
  models.MODELS.lookup(config.model)
  optim.OPTIMIZERS.lookup(config.optimizer)
  optim.SCHEDULES.lookup(config.schedule)
  if config.activation is not None:
    activations.ACTIVATIONS.lookup(config.activation)
  fields = models.model_fields(config.model)
  for name in ("activation", "dropout", "hidden_size", "num_layers", "bidirectional"):
    if getattr(config, name) is not None and name not in fields:
      raise ConfigError(f"--{name} does not apply to model {config.model!r} (it has no {name})")
  if config.rnn_implementation is not None:
    if "implementation" not in fields:
      raise ConfigError(f"--rnn_implementation does not apply to model {config.model!r} "
                        "(it is not recurrent)")
    from jdl.models import rnn
    cell = models.build_model(config.model).cell
    dtype = "bfloat16" if config.precision == "bfloat16" else "float32"
    rnn.check_implementation(config.rnn_implementation, cell, dtype, backend=True)

  def check(ok, message):
    if not ok:
      raise ConfigError(message)

  finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)
  check(finite(config.learning_rate) and config.learning_rate > 0,
        f"learning_rate must be > 0, got {config.learning_rate}")
  check(config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}")
  for name in ("hidden_size", "num_layers"):
    value = getattr(config, name)
    check(value is None or value >= 1, f"{name} must be >= 1, got {value}")
  check(config.epochs >= 0, f"epochs must be >= 0, got {config.epochs}")
  check(config.dropout is None or 0.0 <= config.dropout < 1.0,
        f"dropout must be in [0, 1), got {config.dropout}")
  check(0.0 <= config.validation_fraction < 1.0,
        f"validation_fraction must be in [0, 1), got {config.validation_fraction}")
  check(0.0 <= config.label_smoothing < 1.0,
        f"label_smoothing must be in [0, 1), got {config.label_smoothing}")
  for name in ("weight_decay", "l1", "l2", "clip_norm", "decay_steps", "warmup_steps",
               "num_train", "num_test", "early_stopping_patience"):
    value = getattr(config, name)
    check(finite(value) and value >= 0, f"{name} must be >= 0, got {value}")
  check(0.0 <= config.momentum < 1.0, f"momentum must be in [0, 1), got {config.momentum}")
  check(config.decay_rate > 0, f"decay_rate must be > 0, got {config.decay_rate}")
  check(config.boundary_scale > 0, f"boundary_scale must be > 0, got {config.boundary_scale}")
  check(all(0.0 < b < 1.0 for b in config.boundaries) and list(config.boundaries) == sorted(config.boundaries),
        f"boundaries must be increasing fractions in (0, 1), got {list(config.boundaries)}")
  check(config.nan_policy in ("stop", "skip"),
        f"nan_policy must be stop or skip, got {config.nan_policy!r}")
  from jdl.data.augmentation import FILL_MODES
  for name in ("aug_width_shift", "aug_height_shift", "aug_rotation"):
    value = getattr(config, name)
    check(finite(value) and value >= 0, f"{name} must be >= 0, got {value}")
    check(name == "aug_rotation" or value < 1 or value == int(value),
          f"{name} must be a fraction of the side (< 1) or whole pixels, got {value}")
  check(config.aug_rotation <= 180, f"aug_rotation must be <= 180 degrees, got {config.aug_rotation}")
  check(config.aug_fill_mode in FILL_MODES,
        f"aug_fill_mode must be one of {', '.join(FILL_MODES)}, got {config.aug_fill_mode!r}")
  check(finite(config.aug_erase_prob) and 0.0 <= config.aug_erase_prob <= 1.0,
        f"aug_erase_prob must be in [0, 1], got {config.aug_erase_prob}")
  area = tuple(config.aug_erase_area)
  check(len(area) == 2 and all(map(finite, area)) and 0.0 < area[0] <= area[1] <= 1.0,
        f"aug_erase_area must be two fractions 0 < min <= max <= 1, got {list(area)}")
  check(config.precision in ("float32", "bfloat16"),
        f"precision must be float32 or bfloat16, got {config.precision!r}")
  check(config.num_seeds >= 1, f"num_seeds must be >= 1, got {config.num_seeds}")
  from jdl import data, heads
  heads.HEADS.lookup(config.head)
  check(config.regression_loss in heads.REGRESSION_LOSSES,
        f"regression_loss must be one of {', '.join(heads.REGRESSION_LOSSES)}, got {config.regression_loss!r}")
  if config.dataset in data.KNOWN_LABELS:
    heads.check(config.head, *data.KNOWN_LABELS[config.dataset], config.dataset)
  check(not (config.head == "regression" and config.label_smoothing),
        "--label_smoothing smooths class labels; --head=regression has real-valued targets")
  check(not (config.head == "regression" and config.augment),
        "--augment with --head=regression: shifts and rotations can cut a shape at the border and erasing "
        "can hide part of it, changing the size the target measures; drop --augment")
  check(config.num_seeds == 1 or config.head == "softmax",
        f"--num_seeds > 1 trains softmax heads only; drop --num_seeds for --head={config.head}")
  check(not (config.num_seeds > 1 and config.early_stopping_patience),
        "--num_seeds > 1 trains every replica for --epochs; drop --early_stopping_patience")
  check(config.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {config.keep_checkpoints}")
  check(config.log_every >= 1, f"log_every must be >= 1, got {config.log_every}")
  check(not (config.early_stopping_patience and config.validation_fraction == 0),
        "early_stopping_patience needs a validation split (validation_fraction > 0)")
