r"""A small DCGAN: generator and discriminator trained on images, scored offline.

Offline on the built-in shapes (about 6 minutes on 2 CPU cores):
  python -m experiments.gan --workdir=runs/gan
Class-conditional, on MNIST when it is prepared or downloadable:
  python -m experiments.gan --dataset=mnist --conditional --workdir=runs/cgan-mnist
Each epoch writes WORKDIR/samples/epoch_NNN.png (fixed noise) and logs the
losses, D(x), D(G(z)) and the Fréchet distance between real and generated
images in the feature space of a jdl cnn trained on the same data (not
comparable with Inception-based FID). Rerunning with the same --workdir resumes.
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
  gan.fit(config)


if __name__ == "__main__":
  cli.run(main)
