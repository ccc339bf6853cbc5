r"""Transfer learning: the course notes' four scenarios, offline on shapes.

Pretrains on the shapes source task (classes 0-4), then transfers to classes
5-9 in the same style (similar) and as line sketches (different), each with a
small and a large training set, next to from-scratch baselines:
  python -m experiments.transfer --scenario=all --workdir=runs/transfer
One scenario, with cached bottleneck features:
  python -m experiments.transfer --scenario=small_similar --bottleneck --workdir=runs/transfer
From an experiments.cifar run, or a torchvision ResNet-18 saved as .safetensors:
  python -m experiments.transfer --pretrained_workdir=runs/cnn --scenario=small_similar
  python -m experiments.transfer --model=resnet18 --pretrained_weights=resnet18.safetensors
Rerunning with the same --workdir resumes every unfinished run.
"""
from absl import flags

from jdl import cli, transfer

cli.define_flags(transfer.TransferConfig, defaults=transfer.FLAG_DEFAULTS)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = cli.config_from_flags(transfer.TransferConfig)
  transfer.validate(config)  # Before anything loads or compiles.
  cli.enable_compilation_cache()
  transfer.run(config)


if __name__ == "__main__":
  cli.run(main)
