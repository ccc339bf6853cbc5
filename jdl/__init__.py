"""jdl: a JAX functional deep-learning library (Flax linen models, Optax training).

  import jdl
  model = jdl.build_model("cnn")                      # a flax.linen.Module
  print(jdl.summarize(model, (32, 32, 3)))            # Keras-style table
  dataset = jdl.load_dataset("shapes", num_train=5000)
  state, results = jdl.fit(jdl.TrainConfig(dataset="shapes", model="cnn", epochs=5), dataset)

Submodules: activations, losses, metrics, optim (optimizers and schedules by
name), models, data, heads (softmax, sigmoid, multi-label and regression
outputs), train, checkpoint, summary, xla (`xla.jit`: jax.jit with
the compile options jdl's steps use), gd and xor (the course notes'
gradient-descent and numpy-network examples).
"""
from jdl import activations, config, data, heads, losses, metrics, models, optim, summary, train, xla  # noqa: F401
from jdl.config import TrainConfig  # noqa: F401
from jdl.data import Dataset, load_dataset  # noqa: F401
from jdl.errors import CheckpointError, ConfigError, DataError, JdlError  # noqa: F401
from jdl.models import MODELS, build_model  # noqa: F401
from jdl.summary import summarize  # noqa: F401
from jdl.core import TrainState  # noqa: F401
from jdl.train import create_train_state, eval_step, fit, train_step  # noqa: F401

__version__ = "0.1.0"
