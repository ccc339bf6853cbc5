"""Runs an experiment and signals itself at a chosen point (for the kill tests).

  python tests/kill_driver.py EXPERIMENT MODE N FLAGS...

EXPERIMENT is a module such as experiments.cifar; MODE says where the signal
comes, N which occurrence:
  step      SIGKILL right after the N-th training step is dispatched (mid-epoch;
            the loop of jdl.train.fit only);
  term      SIGTERM at the same point;
  look      SIGKILL at the N-th time the training loop looks at its stop flag
            (`StopSignals.signum`, read after each step: once per step in the
            gan and colorize loops, once or twice in the text loop); only
            looks from the experiment's own loop count (jdl.gan.loop for
            experiments.gan, ...), not from a classifier it trains first;
  lookterm  SIGTERM at the same point;
  save      SIGKILL right after the N-th checkpoint save returns;
  finalize  SIGKILL inside the N-th Orbax commit: the checkpoint's files are
            written to its temporary directory but it is not yet renamed.
The signals are real; only the moment is chosen, so the tests are deterministic.
Nothing here is imported by jdl.
"""
import importlib
import os
import runpy
import signal
import sys

# The library module whose loop each experiment runs (for look/lookterm).
LOOP_MODULE = {"experiments.gan": "jdl.gan.loop", "experiments.text": "jdl.text",
               "experiments.colorize": "jdl.colorize"}


def main():
  experiment, mode, n, flags = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
  count = [0]

  def tick(signum):
    count[0] += 1
    if count[0] == n:
      sys.stdout.flush()
      os.kill(os.getpid(), signum)

  from jdl import checkpoint, reliability, train
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
  elif mode in ("look", "lookterm"):
    loop = importlib.import_module(LOOP_MODULE.get(experiment, "jdl.train"))
    signum = signal.SIGKILL if mode == "look" else signal.SIGTERM
    original = reliability.StopSignals

    class Watched(original):
      @property
      def signum(self):
        if sys._getframe(1).f_globals["__name__"] == loop.__name__:
          tick(signum)
        return self._signum

      @signum.setter
      def signum(self, value):
        self._signum = value
    # Every module that bound the class by name (`from jdl.reliability import StopSignals`).
    for module in list(sys.modules.values()):
      if getattr(module, "StopSignals", None) is original:
        module.StopSignals = Watched
  else:
    raise SystemExit(f"unknown mode {mode}")
  sys.argv = [experiment.replace(".", "/") + ".py", *flags]
  runpy.run_module(experiment, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
