r"""Sequence classification on MNIST-1D (made locally, offline) with jdl's models.

The published MNIST-1D test accuracies (Greydanus 2020) and the commands that
reach them here (BUILD_NOTES.md has the measured table):
  logistic 32%:  python -m experiments.sequence --model=logistic --validation_fraction=0
  MLP 68%:       python -m experiments.sequence --model=mlp
  CNN 94%:       python -m experiments.sequence --model=cnn1d --dropout=0.3
  GRU 91%:       python -m experiments.sequence --model=gru
Models: logistic, mlp, cnn1d, rnn, lstm, gru (--hidden_size, --num_layers,
--bidirectional). Same flags, outputs and resume as experiments.cifar.
"""
from absl import flags

from jdl import cli, config as config_lib, parallel, seeds, train

# MNIST-1D's reference training: Adam 1e-2, batch 100, no augmentation.
DEFAULTS = dict(dataset="mnist1d", model="gru", learning_rate=1e-2, batch_size=100, epochs=100,
                schedule="cosine")
cli.define_flags(config_lib.TrainConfig, defaults=DEFAULTS)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = cli.config_from_flags(config_lib.TrainConfig, "", config_lib.apply_preset)  # recipes
  config_lib.validate(config)  # Before anything loads or compiles.
  cli.enable_compilation_cache()
  (seeds.fit if config.num_seeds > 1 else train.fit)(config)


def cpu_devices() -> int:
  """CPU devices when --cpu_devices is not given: one per core for a recurrent
  model (jdl.parallel.auto_cpu_devices)."""
  return parallel.auto_cpu_devices(FLAGS.model, FLAGS.batch_size, FLAGS.rnn_implementation)


if __name__ == "__main__":
  cli.run(main, cpu_devices)
