r"""Image classification: the course notes' CIFAR-10 MLP/CNN examples and more.

Offline, in about a minute on 2 CPU cores:
  python -m experiments.cifar --dataset=shapes --model=cnn --epochs=10 --workdir=runs/cnn
The notes' three Keras examples (RMSprop, batch 32, best-validation checkpoint):
  python -m experiments.cifar --preset=keras_cnn_augment --dataset=cifar10
Rerunning with the same --workdir resumes where the run stopped.
What --augment trains on (12 training images and 4 augmentations of each, as
a PNG; nothing is trained):
  python -m experiments.cifar --dataset=cifar10 --augment --aug_width_shift=0.1 \
    --aug_height_shift=0.1 --show_augmented=augmented.png
"""
from absl import flags

from jdl import cli, config as config_lib, seeds, train
from jdl.data import augmentation
from jdl.errors import ConfigError

flags.DEFINE_string("preset", "", "keras_mlp, keras_cnn or keras_cnn_augment: the course "
                    "notes' Keras CIFAR-10 examples; logistic_regression: the notes' one sigmoid "
                    "unit on fashion_mnist_footwear; explicit flags override it")
flags.DEFINE_string("show_augmented", None, "write PATH (a PNG): 12 training images and 4 rows of "
                    "their --augment transforms, as the model would see them, then exit without training")
cli.define_flags(config_lib.TrainConfig)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = cli.config_from_flags(config_lib.TrainConfig, FLAGS.preset, config_lib.apply_preset)
  config_lib.validate(config)  # Before anything loads or compiles.
  if FLAGS.show_augmented:
    if not config.augment:
      raise ConfigError("--show_augmented shows what --augment does; add --augment (and any aug_* flags)")
    _, (images, _), _, (mean, std) = train.load_splits(config)
    path = augmentation.save_preview(FLAGS.show_augmented, images[:12], mean, std,
                                     augmentation.AugmentSpec.from_config(config), seed=config.seed)
    print(f"wrote {path}")
    return
  cli.enable_compilation_cache()
  (seeds.fit if config.num_seeds > 1 else train.fit)(config)


if __name__ == "__main__":
  cli.run(main)
