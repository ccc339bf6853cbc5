"""Models, chosen by name from one registry.

Every model is a `flax.linen.Module` whose hyperparameters are dataclass fields
and whose call is `model.apply(variables, x, train=...) -> (logits, features)`:
logits are float32 (B, num_classes) whatever the compute `dtype`; `features`
holds named intermediates, always 'pre_logits' (the head's input).

    model = build_model('resnet20', num_classes=100, dtype=jnp.bfloat16)
"""
import dataclasses
import functools
from typing import Set

import flax.linen as nn

from jdl.errors import ConfigError
from jdl.registry import Registry
from jdl.models import layers
from jdl.models.alexnet import AlexNet
from jdl.models.cnn import CNN, LeNet5
from jdl.models.cnn1d import CNN1D
from jdl.models.decoder import Decoder, Discriminator, Generator
from jdl.models.fastnet import ConvGroup, FastNet
from jdl.models.googlenet import GoogLeNet, Inception
from jdl.models.mlp import MLP
from jdl.models.rnn import RNN, RNNClassifier, RecurrentLayer
from jdl.pretrained import convert_torch_state_dict  # with the other PyTorch weights
from jdl.models.resnet import (BasicBlock, Bottleneck, ResNet, ResNet18, ResNet20,
                               ResNet34, ResNet50)
from jdl.models.vgg import VGG

MODELS = Registry("model")
MODELS.register("mlp", MLP)
MODELS.register("cnn", CNN)
MODELS.register("lenet5", LeNet5)
MODELS.register("vgg", VGG)
MODELS.register("vgg11", functools.partial(VGG, depth=11))
MODELS.register("vgg13", functools.partial(VGG, depth=13))
MODELS.register("vgg16", functools.partial(VGG, depth=16))
MODELS.register("vgg19", functools.partial(VGG, depth=19))
MODELS.register("resnet20", ResNet20)
MODELS.register("resnet18", ResNet18)
MODELS.register("resnet34", ResNet34)
MODELS.register("resnet50", ResNet50)
MODELS.register("fastnet", FastNet)
MODELS.register("alexnet", AlexNet)  # stem='imagenet' for torchvision's layout
MODELS.register("googlenet", GoogLeNet)  # likewise
# Sequence classifiers (inputs (B, T, F)); mlp works on them too.
MODELS.register("logistic", functools.partial(MLP, hidden_sizes=(), dropout=0.0))
MODELS.register("cnn1d", CNN1D)
MODELS.register("rnn", functools.partial(RNNClassifier, cell="rnn"))
MODELS.register("lstm", functools.partial(RNNClassifier, cell="lstm"))
MODELS.register("gru", functools.partial(RNNClassifier, cell="gru"))

# Module fields that are Flax plumbing, not hyperparameters.
_NOT_HYPERPARAMETERS = frozenset({"parent", "name"})


def _module_class(ctor):
  while isinstance(ctor, functools.partial):
    ctor = ctor.func
  return ctor


def model_fields(name: str) -> Set[str]:
  """Returns the hyperparameter names `build_model(name, ...)` accepts.

  Arguments:
    name: a registered model name (ConfigError if unknown).
  """
  cls = _module_class(MODELS.lookup(name))
  return {f.name for f in dataclasses.fields(cls)} - _NOT_HYPERPARAMETERS


def build_model(name: str, **overrides) -> nn.Module:
  """Constructs the model registered as `name`, with fields overridden.

  Lists become tuples, so a config or flag value like [64, 128] keeps the module
  hashable. On the CPU the model gets jdl's CPU kernels for its conv, pool and
  recurrence fields (`jdl.ops.choices`; an override of such a field wins).

  Arguments:
    name: a registered model name, see `MODELS.names()`.
    **overrides: field values, e.g. num_classes=100, dtype=jnp.bfloat16.

  Raises:
    ConfigError: unknown name, a field the model does not have, or a bad value.
  """
  ctor = MODELS.lookup(name)
  fields = model_fields(name)
  for key in overrides:
    if key not in fields:
      raise ConfigError(f"model {name!r} has no field {key!r}; "
                        f"its fields: {', '.join(sorted(fields))}")
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  from jdl import ops
  return ctor(**{**ops.choices(ctor), **overrides})


__all__ = [
    "MODELS", "build_model", "model_fields", "layers",
    "MLP", "CNN", "LeNet5", "VGG", "ResNet", "ResNet18", "ResNet20", "ResNet34",
    "ResNet50", "BasicBlock", "Bottleneck", "FastNet", "ConvGroup", "CNN1D",
    "RNN", "RNNClassifier", "RecurrentLayer", "convert_torch_state_dict",
    "AlexNet", "GoogLeNet", "Inception",
    "Decoder", "Generator", "Discriminator",  # image generators: not classifiers, not in MODELS
]
