r"""Image classification: the course notes' CIFAR-10 MLP/CNN examples and more.

Offline, in about a minute on 2 CPU cores:
  python -m experiments.cifar --dataset=shapes --model=cnn --epochs=10 --workdir=runs/cnn
The notes' three Keras examples (RMSprop, batch 32, best-validation checkpoint):
  python -m experiments.cifar --preset=keras_cnn_augment --dataset=cifar10
Rerunning with the same --workdir resumes where the run stopped.
"""
from absl import flags

from jdl import cli, config as config_lib, seeds, train

flags.DEFINE_string("preset", "", "keras_mlp, keras_cnn or keras_cnn_augment: the course "
                    "notes' Keras CIFAR-10 examples; explicit flags override it")
cli.define_flags(config_lib.TrainConfig)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = cli.config_from_flags(config_lib.TrainConfig, FLAGS.preset, config_lib.apply_preset)
  config_lib.validate(config)  # Before anything loads or compiles.
  cli.enable_compilation_cache()
  (seeds.fit if config.num_seeds > 1 else train.fit)(config)


if __name__ == "__main__":
  cli.run(main)
