"""Runs an experiment and signals itself at a chosen point (for the kill tests).

  python tests/kill_driver.py EXPERIMENT MODE N FLAGS...

EXPERIMENT is a module such as experiments.cifar; MODE says where the signal
comes, N which occurrence:
  step      SIGKILL right after the N-th training step is dispatched (mid-epoch);
  term      SIGTERM at the same point;
  save      SIGKILL right after the N-th checkpoint save returns;
  finalize  SIGKILL inside the N-th Orbax commit: the checkpoint's files are
            written to its temporary directory but it is not yet renamed.
The signals are real; only the moment is chosen, so the tests are deterministic.
Every task runs `jdl.engine.run`, so the points are the engine's. Nothing here
is imported by jdl.
"""
import os
import runpy
import signal
import sys


def main():
  experiment, mode, n, flags = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
  count = [0]

  def tick(signum):
    count[0] += 1
    if count[0] == n:
      sys.stdout.flush()
      os.kill(os.getpid(), signum)

  from jdl import checkpoint, engine
  if mode in ("step", "term"):
    accumulating = engine._accumulating

    def patched(step_fn):
      fn = accumulating(step_fn)

      def step(*a):
        out = fn(*a)
        tick(signal.SIGKILL if mode == "step" else signal.SIGTERM)
        return out
      return step
    engine._accumulating = patched
  elif mode == "save":
    save = checkpoint.save

    def patched_save(*args, **kwargs):
      save(*args, **kwargs)
      tick(signal.SIGKILL)
    checkpoint.save = patched_save
  elif mode == "finalize":
    from orbax.checkpoint._src.path import atomicity
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def patched_finalize(self, *args, **kwargs):
      tick(signal.SIGKILL)
      return await finalize(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = patched_finalize
  else:
    raise SystemExit(f"unknown mode {mode}")
  sys.argv = [experiment.replace(".", "/") + ".py", *flags]
  runpy.run_module(experiment, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
