"""Bad input to the cifar entrypoint: one line on stderr, exit 2, nothing compiled.

The entrypoint runs in-process (flags parsed by absl exactly as on the command
line) so that 30 cases cost seconds; a JAX monitoring listener proves that no
XLA compilation happened before the error.
"""
import dataclasses
import json
import os

import jax
import pytest
from absl import flags

from experiments import cifar
from jdl import cli
from jdl.config import TrainConfig

FLAGS = flags.FLAGS
cli.define_common_flags()

CASES = [
    # Unknown names list the valid ones.
    (["--model=resnet99"], "unknown model 'resnet99'; choose one of: "),
    (["--cpu_kernels=max_pool,turbo"], "unknown CPU kernel 'turbo' in JDL_CPU_KERNELS/--cpu_kernels"),
    (["--optimizer=adamax"], "unknown optimizer 'adamax'; choose one of: adagrad, adam"),
    (["--schedule=sawtooth"], "unknown schedule 'sawtooth'; choose one of: constant"),
    (["--activation=swish2"], "unknown activation 'swish2'; choose one of: elu, gelu"),
    (["--dataset=cifar11"], "unknown dataset 'cifar11': use 'shapes'"),
    (["--preset=keras"], "unknown preset 'keras'; choose one of: keras_cnn"),
    (["--nan_policy=ignore"], "nan_policy must be stop or skip"),
    (["--precision=float16"], "precision must be float32 or bfloat16"),
    # Out-of-range numbers.
    (["--learning_rate=0"], "learning_rate must be > 0"),
    (["--learning_rate=-0.1"], "learning_rate must be > 0"),
    (["--learning_rate=nan"], "learning_rate must be > 0"),
    (["--batch_size=0"], "batch_size must be >= 1"),
    (["--batch_size=1000"], "batch_size 1000 is larger than the training split (180 examples"),
    (["--dropout=1"], "dropout must be in [0, 1)"),
    (["--dropout=-0.2"], "dropout must be in [0, 1)"),
    (["--epochs=-1"], "epochs must be >= 0"),
    (["--validation_fraction=1"], "validation_fraction must be in [0, 1)"),
    (["--label_smoothing=1.5"], "label_smoothing must be in [0, 1)"),
    (["--weight_decay=-1"], "weight_decay must be >= 0"),
    (["--l2=-0.01"], "l2 must be >= 0"),
    (["--momentum=1"], "momentum must be in [0, 1)"),
    (["--decay_rate=0"], "decay_rate must be > 0"),
    (["--boundaries=0.8,0.2"], "boundaries must be increasing fractions in (0, 1)"),
    (["--keep_checkpoints=0"], "keep_checkpoints must be >= 1"),
    (["--model=gru", "--hidden_size=0"], "hidden_size must be >= 1"),
    # Contradictory combinations.
    (["--early_stopping_patience=2", "--validation_fraction=0"], "early_stopping_patience needs a validation split"),
    (["--model=resnet20", "--dropout=0.3"], "--dropout does not apply to model 'resnet20'"),
    (["--num_layers=2"], "--num_layers does not apply to model 'cnn'"),
    (["--rnn_implementation=cudnn"], "--rnn_implementation does not apply to model 'cnn'"),
    (["--model=gru", "--rnn_implementation=cudnn"], "rnn implementation 'cudnn' runs only the lstm cell"),
    (["--model=lstm", "--rnn_implementation=fused"], "unknown rnn implementation 'fused'"),
    (["--model=lstm", "--rnn_implementation=cudnn", "--precision=bfloat16"],
     "rnn implementation 'cudnn' computes in float32 only, not bfloat16"),
    (["--augment", "--dataset=mnist1d", "--model=cnn1d"], "--augment needs images (H, W, C); mnist1d"),
    # Malformed command lines.
    (["--epochs=ten"], "flag --epochs=ten: invalid literal for int()"),
    (["--boundaries=half"], "--boundaries must be a comma-separated list of numbers"),
    (["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
    (["extra_word"], "unexpected arguments extra_word"),
    # Workdirs.
    (["WORKDIR=blocked/run"], "is not writable"),
    (["WORKDIR=other"], "holds a classifier run with model='mlp', not 'cnn'"),
    (["WORKDIR=gan"], "holds a gan run, not a classifier run"),
    # Paths from flags expand ~ as a shell would.
    (["--dataset=cifar10", "--data_dir=~/jdl-no-such-dir"],
     f"is in none of {os.path.expanduser('~/jdl-no-such-dir')}/cifar10, "),
]


@pytest.fixture
def compiles():
  """Records XLA compilations (fresh or from the persistent cache) during a test."""
  events = []

  def on_duration(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      events.append(event)

  def on_event(event, **kwargs):
    if "compilation_cache" in event:  # Cache hits skip the backend compile.
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  jax.monitoring.register_event_listener(on_event)
  yield events
  jax.monitoring.unregister_event_duration_listener(on_duration)
  jax.monitoring.unregister_event_listener(on_event)


def test_the_compile_listener_sees_compiles(compiles):
  jax.jit(lambda x: x * 3 + 1)(2.0)
  assert compiles


@pytest.mark.parametrize("args,message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_before_compiling(tmp_path, capsys, compiles, args, message):
  (tmp_path / "blocked").write_text("a file where the workdir's parent should be")
  # Workdirs that hold a checkpoint of another run (the check comes before any restore).
  other = {"task": "classifier", **dataclasses.asdict(TrainConfig(
      dataset="shapes", num_train=200, num_test=50, model="mlp", epochs=2))}
  for name, record in (("other", other), ("gan", {**other, "task": "gan"})):
    (tmp_path / name / "checkpoints" / "1").mkdir(parents=True)
    (tmp_path / name / "config.json").write_text(json.dumps(record))
  workdir = str(tmp_path / "run")
  if args[0].startswith("WORKDIR="):
    workdir, args = str(tmp_path / args[0][len("WORKDIR="):]), args[1:]
  argv = ["cifar", "--dataset=shapes", "--num_train=200", "--num_test=50",
          f"--workdir={workdir}", *args]
  FLAGS.unparse_flags()
  try:
    with pytest.raises(SystemExit) as exit_info:
      cli.call(cifar.main, cli.parse_flags(argv))
  finally:
    FLAGS.unparse_flags()
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: "), err
  assert message in err, err
  assert not compiles, "compiled before failing"
  if not args or "WORKDIR" not in " ".join(args):
    assert not os.path.exists(tmp_path / "run"), "left a run directory behind"


def test_there_are_at_least_25_cases():
  assert len(CASES) >= 25
