"""Runs `experiments.cifar` and signals itself at a chosen point (for test_reliability).

  python tests/kill_driver.py MODE N FLAGS...

MODE says where the signal comes, N which occurrence:
  step      SIGKILL right after the N-th training step is dispatched (mid-epoch);
  save      SIGKILL right after the N-th checkpoint save returns;
  finalize  SIGKILL inside the N-th Orbax commit: the checkpoint's files are
            written to its temporary directory but it is not yet renamed;
  term      SIGTERM right after the N-th training step is dispatched.
The signals are real; only the moment is chosen, so the tests are deterministic.
Nothing here is imported by jdl.
"""
import os
import runpy
import signal
import sys


def main():
  mode, n, flags = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
  count = [0]

  def tick(signum):
    count[0] += 1
    if count[0] == n:
      sys.stdout.flush()
      os.kill(os.getpid(), signum)

  from jdl import checkpoint, train
  if mode in ("step", "term"):
    make_train_fn = train.make_train_fn

    def patched_make_train_fn(*args, **kwargs):
      fn = make_train_fn(*args, **kwargs)

      def step(*a):
        out = fn(*a)
        tick(signal.SIGKILL if mode == "step" else signal.SIGTERM)
        return out
      return step
    train.make_train_fn = patched_make_train_fn
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
  sys.argv = ["experiments/cifar.py", *flags]
  runpy.run_module("experiments.cifar", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
