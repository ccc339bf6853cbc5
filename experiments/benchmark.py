r"""Times jdl's training step (and, with --compare=torch, PyTorch's) on this machine.

  python -m experiments.benchmark --model=cnn --batch_size=128
  python -m experiments.benchmark --model=lstm --batch_size=64 --compare=torch
  python -m experiments.benchmark --model=dcgan --batch_size=64 --compare=torch --json
  python -m experiments.benchmark --model=fastnet --precision=bfloat16 --steps_per_call=10
  python -m experiments.benchmark --model=cnn --ab_kernels=max_pool   # what a CPU kernel saves
Synthetic data, warm-up excluded; compile time is reported separately (cold).
See jdl/benchmark.py for what each figure means.
"""
import json

from absl import flags

from jdl import benchmark, cli, parallel
from jdl.errors import ConfigError

flags.DEFINE_string("model", "cnn", "a jdl classifier (cnn, lstm, fastnet, resnet18, ...) or dcgan")
flags.DEFINE_integer("batch_size", 128, "examples per training step")
flags.DEFINE_string("precision", "float32", "compute dtype: float32 or bfloat16")
flags.DEFINE_integer("steps", 20, "timed calls")
flags.DEFINE_integer("warmup", 3, "untimed calls after compiling")
flags.DEFINE_integer("steps_per_call", 1, "training steps per host call, in one lax.scan")
flags.DEFINE_string("rnn_implementation", None,
                    "lstm: scan (default) or cudnn (the cuDNN kernel, CUDA GPU, float32)")
flags.DEFINE_string("compare", "", "'torch': time the same architecture in PyTorch in the same run")
flags.DEFINE_string("ab_kernels", "", "A/B of CPU kernels (jdl.ops): time the step with the "
                    "selected kernels against the step without these (a comma list), in one loop")
flags.DEFINE_integer("replicas", 1, "with --ab_kernels: time the --num_seeds=N step (N stacked "
                     "replicas, one vmapped step)")
flags.DEFINE_boolean("json", False, "print one JSON object instead of a table")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if FLAGS.compare not in ("", "torch"):
    raise ConfigError(f"--compare must be torch or empty, got {FLAGS.compare!r}")
  if FLAGS.ab_kernels:
    result = benchmark.compare_kernels(FLAGS.model, FLAGS.ab_kernels, batch_size=FLAGS.batch_size,
                                       precision=FLAGS.precision, steps=FLAGS.steps,
                                       warmup=FLAGS.warmup, replicas=FLAGS.replicas)
    if FLAGS.json:
      print(json.dumps(result, sort_keys=True))
    else:
      print(f"{FLAGS.model}, batch {FLAGS.batch_size}" + (f", {FLAGS.replicas} replicas" if FLAGS.replicas > 1 else "")
            + f": step {result['with']['step_ms']:.1f} ms with "
            f"every kernel, {result['without']['step_ms']:.1f} ms without "
            f"{', '.join(result['kernels'])}: they save {result['saving']:.1%}")
    return
  # With --compare=torch both sides are timed in one loop, alternating every
  # 5 steps, so a host that changes speed mid-run moves both alike.
  run = benchmark.compare_torch if FLAGS.compare else benchmark.benchmark
  result = run(FLAGS.model, batch_size=FLAGS.batch_size, precision=FLAGS.precision,
               steps=FLAGS.steps, warmup=FLAGS.warmup, steps_per_call=FLAGS.steps_per_call,
               rnn_implementation=FLAGS.rnn_implementation)
  if FLAGS.json:
    print(json.dumps(result, sort_keys=True))
    return
  rows = [result] + ([result["torch"]] if FLAGS.compare else [])
  print(f"{'framework':<10}{'model':<10}{'batch':>6}{'params':>12}{'compile s':>11}"
        f"{'step ms (p10-p90)':>24}{'ex/s':>10}{'GFLOP/step':>12}{'matmul GF':>11}{'MFU':>7}")
  gflop = lambda value, width: f"{value / 1e9:>{width}.2f}" if value else f"{'-':>{width}}"
  for r in rows:  # the PyTorch side has no FLOP count: '-'
    mfu = r.get("mfu")
    print(f"{r['framework']:<10}{r['model']:<10}{r['batch_size']:>6}{r['params']:>12,}"
          f"{r['compile_s']:>11.2f}"
          f"{r['step_ms']:>10.1f} ({r['step_ms_p10']:.1f}-{r['step_ms_p90']:.1f})".ljust(0)
          + f"{r['examples_per_s']:>10,.0f}" + gflop(r.get("flops_per_step"), 12)
          + gflop(r.get("matmul_flops_per_step"), 11)
          + (f"{mfu:>7.1%}" if mfu else f"{'n/a':>7}"))
  print(f"device: {result['device_kind']} x{result['device_count']}")
  if FLAGS.compare:
    print(f"jdl / PyTorch throughput: {result['ratio_vs_torch']:.2f}x")
  host = result["host"]
  if not host["quiet"]:
    print(f"WARNING: other processes used {host['other_cores']:.2f} cores on average while timing "
          f"(load average {host['load_before']:.2f} before): these figures cannot be trusted; "
          "rerun on a quiet machine")


def cpu_devices() -> int:
  """CPU devices when --cpu_devices is not given: one per core for a recurrent
  model (jdl.parallel.auto_cpu_devices)."""
  return parallel.auto_cpu_devices(FLAGS.model, FLAGS.batch_size, FLAGS.rnn_implementation)


if __name__ == "__main__":
  cli.run(main, cpu_devices)
