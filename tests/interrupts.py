"""In-process interruptions of `jdl.engine.run` and bit-for-bit comparison of two runs.

`sigterm_at_step(monkeypatch, n)` makes the n-th step the loop dispatches send
a real SIGTERM to this process (the tests run in the main thread, where the
engine's handler catches it), so a task can be stopped mid-epoch, resumed and
compared with an uninterrupted run in one process, without starting Python
and compiling again. The SIGKILL chain, which needs a process to kill, runs
once on the classifier (test_reliability.py).
"""
import json
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp

from jdl import engine


def sigterm_at_step(monkeypatch, n: int) -> None:
  """The n-th dispatched step (counted from now) is followed by SIGTERM."""
  count = [0]
  accumulating = engine._accumulating

  def patched(step_fn):
    fn = accumulating(step_fn)

    def step(*args):
      out = fn(*args)
      count[0] += 1
      if count[0] == n:
        os.kill(os.getpid(), signal.SIGTERM)
      return out
    return step
  monkeypatch.setattr(engine, "_accumulating", patched)


def checkpoints(workdir: str) -> dict:
  """{'latest': (step, {path: array}), 'best': ...} of WORKDIR/checkpoints (best:
  the step the latest checkpoint's loop metadata names, if any)."""
  directory = os.path.join(workdir, "checkpoints")
  out = {}
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as m:
    latest = m.latest_step()
    meta = m.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    for name, step in (("latest", latest), ("best", meta.get("best_step"))):
      if step is None:
        continue
      tree = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
      out[name] = (step, {jax.tree_util.keystr(p): np.asarray(v)
                          for p, v in jax.tree_util.tree_leaves_with_path(tree)})
  return out


def metrics(workdir: str) -> list:
  """metrics.jsonl without its timings."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rows]


def assert_same_run(a: str, b: str) -> None:
  """Two workdirs hold the same latest and best checkpoints, bit for bit, and the
  same metrics rows. (Which older checkpoints are kept depends on where a run
  was interrupted: a mid-epoch checkpoint takes one of the latest-N places.)"""
  ca, cb = checkpoints(a), checkpoints(b)
  assert ca.keys() == cb.keys(), (sorted(ca), sorted(cb))
  for name in ca:
    (step_a, arrays_a), (step_b, arrays_b) = ca[name], cb[name]
    assert step_a == step_b and arrays_a.keys() == arrays_b.keys(), (name, step_a, step_b)
    for key in arrays_a:
      np.testing.assert_array_equal(arrays_a[key], arrays_b[key], err_msg=f"{name} {key}")
  assert metrics(a) == metrics(b)
