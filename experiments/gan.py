r"""A small DCGAN: generator and discriminator trained on images, scored offline.

Offline on the built-in shapes (about 6 minutes on 2 CPU cores):
  python -m experiments.gan --workdir=runs/gan
On Fashion-MNIST (28x28x1; the generator's output size follows the data),
plain and class-conditional, the scoring cnn trained once by the dataset's
recipe and reused:
  python -m experiments.gan --dataset=fashion_mnist --classifier_epochs=20 --workdir=runs/gan-fmnist
  python -m experiments.gan --dataset=fashion_mnist --conditional \
      --classifier_workdir=runs/gan-fmnist/classifier --workdir=runs/cgan-fmnist
Each epoch writes WORKDIR/samples/epoch_NNN.png (fixed noise; one row per class
when conditional) and logs the losses, D(x), D(G(z)) and the Fréchet distance
between real and generated images in the feature space of a jdl cnn trained on
the same data (not comparable with Inception-based FID), next to its floors
(real vs real, the untrained generator). The best epoch's generator is the
exported one (samples/best.png). Rerunning with the same --workdir resumes.
Samples from a trained run's best checkpoint, no training (same seed, same picture):
  python -m experiments.gan --sample_only --workdir=runs/cgan-fmnist --label=7 --num=64 --seed=0
"""
from absl import flags

from jdl import cli, gan

cli.define_flags(gan.GANConfig)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = cli.config_from_flags(gan.GANConfig)
  gan.validate_config(config)  # Before anything loads or compiles.
  cli.enable_compilation_cache()
  if config.sample_only:
    gan.sample_only(config)
  else:
    gan.fit(config)


if __name__ == "__main__":
  cli.run(main)
