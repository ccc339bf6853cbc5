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
  augment: bool = option(False, "random translation (up to 4 px) and horizontal flips, on the device")
  # --- model ---
  model: str = option("cnn", "model name (see jdl.models.MODELS)")
  activation: Optional[str] = option(None, "hidden activation by name (model default if unset)")
  dropout: Optional[float] = option(None, "dropout rate in [0, 1) (model default if unset)")
  hidden_size: Optional[int] = option(None, "recurrent models: units per layer and direction (model default if unset)")
  num_layers: Optional[int] = option(None, "recurrent models: stacked layers (model default if unset)")
  bidirectional: Optional[bool] = option(None, "recurrent models: also read the sequence backwards (model default if unset)")
  rnn_implementation: Optional[str] = option(None, "lstm models: scan (any backend) or cudnn (the cuDNN kernel: CUDA GPU, float32) (model default if unset)")
  precision: str = option("float32", "compute dtype: float32 or bfloat16 (parameters stay float32)")
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
  label_smoothing: float = option(0.0, "label smoothing epsilon in [0, 1)")
  epochs: int = option(10, "passes over the training split")
  batch_size: int = option(128, "examples per training step")
  early_stopping_patience: int = option(0, "stop after this many epochs without a better validation accuracy (0: off)")
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
    "keras_cnn_augment": dict(model="cnn", optimizer="rmsprop", learning_rate=1e-3,
                              batch_size=32, epochs=100, augment=True),
}


def apply_preset(config: TrainConfig, preset: str, explicit=()) -> TrainConfig:
  """Returns `config` with `preset`'s values, except fields named in `explicit`.

  Arguments:
    config: the starting configuration.
    preset: a name from PRESETS ('' for none).
    explicit: field names the user set explicitly; they win over the preset.
  """
  if not preset:
    return config
  if preset not in PRESETS:
    raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
  values = {k: v for k, v in PRESETS[preset].items() if k not in explicit}
  return dataclasses.replace(config, **values)


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
  check(config.precision in ("float32", "bfloat16"),
        f"precision must be float32 or bfloat16, got {config.precision!r}")
  check(config.num_seeds >= 1, f"num_seeds must be >= 1, got {config.num_seeds}")
  check(not (config.num_seeds > 1 and config.early_stopping_patience),
        "--num_seeds > 1 trains every replica for --epochs; drop --early_stopping_patience")
  check(config.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {config.keep_checkpoints}")
  check(config.log_every >= 1, f"log_every must be >= 1, got {config.log_every}")
  check(not (config.early_stopping_patience and config.validation_fraction == 0),
        "early_stopping_patience needs a validation split (validation_fraction > 0)")
