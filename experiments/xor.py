r"""The course notes' tiny NumPy networks, rebuilt with jdl.

Two networks trained by full-batch gradient descent on squared error, as in
the NumPy originals (inputs carry a constant third column that acts as a bias):
  1. no hidden layer (one sigmoid unit): learns "output = first input", but
     cannot learn XOR -- it is not linearly separable;
  2. one hidden layer of 4 sigmoid units: solves XOR.
  python -m experiments.xor
The notes' two NumPy programs exactly (no biases, weights from
np.random.seed(1), 10,000 and 60,000 updates; prints their outputs,
[.0097 .0079 .9936 .9921] and [.0026 .9967 .997 .0039], and the error every
10,000 updates):
  python -m experiments.xor --notes
"""
from absl import flags

from jdl import cli
from jdl.errors import ConfigError
from jdl import xor

flags.DEFINE_integer("steps", 10_000, "full-batch gradient-descent steps")
flags.DEFINE_float("learning_rate", 1.0, "step size of plain gradient descent")
flags.DEFINE_integer("seed", 1, "seed of the initial weights")
flags.DEFINE_boolean("notes", False, "run the notes' NumPy programs exactly (the other flags do not apply)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if FLAGS.notes:
    print(xor.notes_report())
    return
  if FLAGS.steps < 1 or FLAGS.learning_rate <= 0:
    raise ConfigError("--steps must be >= 1 and --learning_rate > 0")
  for result in xor.run_all(steps=FLAGS.steps, learning_rate=FLAGS.learning_rate, seed=FLAGS.seed):
    print(xor.format_result(result))


if __name__ == "__main__":
  cli.run(main)
