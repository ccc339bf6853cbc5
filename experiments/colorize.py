r"""Automatic colorization: an encoder and the DCGAN decoder turn grey images into colour.

Offline on the built-in shapes (a few minutes on 2 CPU cores):
  python -m experiments.colorize --workdir=runs/colorize
On CIFAR-10 when it is prepared or downloadable:
  python -m experiments.colorize --dataset=cifar10 --workdir=runs/colorize-cifar
Writes WORKDIR/comparison.png (rows: grey input, prediction, true colour) and
results.json with the test error next to the mean-colour baseline's.
"""
from absl import flags

from jdl import cli, colorize

cli.define_flags(colorize.ColorizeConfig)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = cli.config_from_flags(colorize.ColorizeConfig)
  colorize.validate_config(config)  # Before anything loads or compiles.
  cli.enable_compilation_cache()
  colorize.fit(config)


if __name__ == "__main__":
  cli.run(main)
