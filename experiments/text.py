r"""A character-level stacked-LSTM language model, with temperature sampling.

Offline, on the Python reference text that ships with jdl (a few minutes on 2 CPU cores):
  python -m experiments.text --workdir=runs/text
Any UTF-8 file, or a TFDS text dataset when it is prepared or downloadable:
  python -m experiments.text --text_file=book.txt --workdir=runs/book
  python -m experiments.text --dataset=tiny_shakespeare --workdir=runs/shakespeare
Samples at several softmax temperatures from a trained run:
  python -m experiments.text --sample_only --workdir=runs/text --temperatures=0.5,1,1.5
results.json reports validation bits per character against a character-bigram
baseline computed in the same run. Rerunning with the same --workdir resumes.
"""
from absl import flags

from jdl import cli, parallel, text

cli.define_flags(text.TextConfig)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = cli.config_from_flags(text.TextConfig)
  text.validate(config)  # Before anything loads or compiles.
  cli.enable_compilation_cache()
  if config.sample_only:
    text.sample_only(config)
  else:
    text.fit(config)


def cpu_devices() -> int:
  """CPU devices when --cpu_devices is not given: one per core for a recurrent
  model (jdl.parallel.auto_cpu_devices)."""
  return parallel.auto_cpu_devices("lstm", FLAGS.batch_size, FLAGS.rnn_implementation)


if __name__ == "__main__":
  cli.run(main, cpu_devices)
