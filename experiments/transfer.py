r"""Transfer learning: the course notes' four scenarios, offline on shapes or on Fashion-MNIST.

Pretrains on the source task of --dataset's task family, then transfers to a
similar and a different target, each with a small and a large training set,
next to from-scratch baselines. Offline on shapes (classes 0-4 -> classes 5-9
in the same style, and as line sketches):
  python -m experiments.transfer --scenario=all --workdir=runs/transfer
On real images: Fashion-MNIST's T-shirt/top, Trouser, Pullover, Dress, Coat ->
its Sandal, Shirt, Sneaker, Bag, Ankle boot (similar; 50 per class or all
6,000), and -> grey 28x28 shapes (different), with the bottleneck head:
  python -m experiments.transfer --dataset=fashion_mnist --scenario=all --workdir=runs/transfer-fmnist
  python -m experiments.transfer --dataset=fashion_mnist --scenario=small_similar --bottleneck \
      --head_pool=avg --workdir=runs/transfer-fmnist
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
