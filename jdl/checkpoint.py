"""Checkpoints with Orbax: the latest N for resume, and the best one kept beside them.

Layout in a workdir:
  checkpoints/<step>/   each holds the state (params, batch_stats, opt_state,
                        step) and JSON loop metadata (epoch, position inside
                        it, early-stopping bookkeeping): enough to resume
                        exactly; with a best-tracking run also Orbax's
                        `metrics` item, the value the best is chosen by.
One `CheckpointManager` keeps the latest `keep` checkpoints and, with
`best_mode`, also the best one by its metric (Orbax's `best_fn`/`best_mode`
with a `LatestN` + `BestN` preservation policy), so the best survives
however many epochs follow it. Orbax writes each checkpoint to
`<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a run killed
mid-write leaves no half checkpoint under a step name; the leftover is
removed when the workdir is next opened. Nothing here uses pickle: arrays go
to TensorStore/OCDBT, metadata to JSON.

Restoring checks the stored shapes against the model first, so a checkpoint of
another architecture is refused with the parameter path and both shapes; a
damaged checkpoint is refused with its directory named, and nothing on disk is
changed or deleted either way.
"""
import os
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from jdl.errors import CheckpointError
from jdl.optim import path_of

def _items() -> dict:
  """Orbax's handlers of a checkpoint's two items (made per manager: creating one
  touches JAX's backend, which must not start when jdl is imported)."""
  return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def _best_key(mode: str):
  """Orbax's best_fn: the metric, ties going to the earliest step (the first to reach it).

  Orbax keeps the last of the checkpoints sorted by this key (ascending for
  'max', descending for 'min'), so among equal values the earliest step sorts last.
  """
  if mode == "max":
    return lambda m: (m["value"], -m["step"])
  return lambda m: (m["value"], m["step"])


class Checkpoints:
  """The checkpoints of one workdir: the latest `keep`, and the best by a metric.

  Arguments:
    workdir: the run's directory; checkpoints go to WORKDIR/checkpoints.
    keep: how many of the latest checkpoints to keep.
    best_mode: 'max' or 'min' to keep the best checkpoint too (by the metric
      passed to `save`), None for none.
  """

  def __init__(self, workdir: str, keep: int = 2, best_mode: Optional[str] = None):
    policies = [checkpoint_managers.LatestN(n=keep)]
    if best_mode is not None:
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=_best_key(best_mode), reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        create=True,
        best_fn=_best_key(best_mode) if best_mode else None,
        best_mode=best_mode or "max",
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        # Leftovers of a save killed before its rename; never a usable checkpoint.
        cleanup_tmp_directories=True,
        # Synchronous saves: a save has finished when `save` returns, which keeps
        # resume semantics simple, and a small model's save is brief (BUILD_NOTES.md).
        enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                         options=options, item_handlers=_items())
    self.tracks_best = best_mode is not None

  def save(self, step: int, state: Any, meta: dict, best_value: Optional[float] = None) -> None:
    """Saves `state` (any pytree of arrays) and JSON `meta` under `step`.

    `best_value`: this state's metric (None: not a candidate for the best, e.g.
    non-finite parameters, or a save inside an epoch). A checkpoint already
    at `step` is replaced: after a resume the same step is recomputed
    (bit-identically on CPU) and saved again.
    """
    save(self.manager, step, state, meta,
         metrics=None if best_value is None else {"value": float(best_value), "step": int(step)})

  def restore_latest(self, target: Any) -> Optional[Tuple[Any, dict]]:
    return restore(self.manager, target)

  def restore_best(self, target: Any) -> Optional[Tuple[Any, dict]]:
    """The best checkpoint (None when none has a metric)."""
    step = self.manager.best_step() if self.tracks_best else None
    return None if step is None else restore(self.manager, target, step)

  def reached_preemption(self, step: int) -> bool:
    """On several hosts: whether every process has agreed to stop and save at `step`
    after a SIGTERM (JAX's preemption sync point). Always False on one host."""
    return jax.process_count() > 1 and self.manager.reached_preemption(step)

  def close(self) -> None:
    self.manager.close()


def shapes_by_path(tree) -> Dict[str, Tuple[int, ...]]:
  """{'params/conv1/kernel': shape} for every leaf of `tree` (Python scalars: ())."""
  return {path_of(path): tuple(np.shape(leaf))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_compatible(stored, target, where: str) -> None:
  """Raises CheckpointError naming the first parameter whose shape or presence differs.

  Arguments:
    stored: the checkpoint's tree metadata (leaves with .shape and .dtype).
    target: the tree to restore into.
    where: the checkpoint's directory, for the message.
  """
  have, want = shapes_by_path(stored), shapes_by_path(target)
  # Parameters first: they are what a user recognises.
  order = sorted(set(have) | set(want), key=lambda p: (not p.startswith("params"), p))
  for path in order:
    if path not in have:
      raise CheckpointError(f"checkpoint {where} does not fit the model: it has no {path} "
                            f"(the model's is {want[path]})")
    if path not in want:
      raise CheckpointError(f"checkpoint {where} does not fit the model: it has {path} "
                            f"{have[path]}, which the model lacks")
    if have[path] != want[path]:
      raise CheckpointError(f"checkpoint {where} does not fit the model: {path} is "
                            f"{have[path]} in the checkpoint but {want[path]} in the model")


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         metrics: Optional[dict] = None) -> None:
  """Saves `state` and JSON `meta` under `step` (replacing one already there)."""
  if step in manager.all_steps():
    manager.delete(step)
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, target: Any,
            step: Optional[int] = None) -> Optional[Tuple[Any, dict]]:
  """Restores into the structure of `target`; None when there is no checkpoint.

  Arguments:
    manager: e.g. `Checkpoints.manager`.
    target: a pytree with the shapes and dtypes to restore (e.g. a fresh state).
    step: which checkpoint; the newest when None.
  Raises:
    CheckpointError: the checkpoint is damaged or holds another architecture.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  where = os.path.join(str(manager.directory), str(step))
  hint = ("; move it away (or delete it) to resume from an earlier checkpoint, "
          "or use another --workdir")
  try:
    stored = manager.item_metadata(step)["state"]
  except Exception as e:  # noqa: BLE001 -- any failure to read is reported, with its cause.
    raise CheckpointError(f"checkpoint {where} is damaged or unreadable "
                          f"({type(e).__name__}: {_first_line(e)}){hint}") from None
  if stored is None:
    raise CheckpointError(f"checkpoint {where} is damaged or unreadable (no state metadata){hint}")
  check_compatible(stored, target, where)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"checkpoint {where} is damaged or unreadable "
                          f"({type(e).__name__}: {_first_line(e)}){hint}") from None
  return restored["state"], dict(restored["meta"])


def _first_line(e: Exception, limit: int = 200) -> str:
  text = str(e).strip().splitlines()
  return (text[0] if text else "")[:limit]


def restore_arrays(workdir: str, best: bool = True) -> Optional[Tuple[Tuple[Any, dict], int]]:
  """A run's best (else newest) checkpoint as stored (nested dicts of arrays).

  For reading another run's weights without knowing its exact structure (e.g.
  its class count, for transfer learning); nothing in `workdir` is changed.
  Returns ((state, meta), step), or None when there is no checkpoint.
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  manager = ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(create=False, read_only=True),
      item_handlers=_items())
  try:
    step = manager.latest_step()
    if step is None:
      return None
    if best:
      # The meta of the newest checkpoint says which step is best (and how it was chosen).
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      if meta.get("best_step") in manager.all_steps():
        step = meta["best_step"]
    where = os.path.join(str(manager.directory), str(step))
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 -- any failure to read is reported, with its cause.
      raise CheckpointError(f"checkpoint {where} is damaged or unreadable "
                            f"({type(e).__name__}: {_first_line(e)})") from None
    return (restored["state"], dict(restored["meta"])), step
  finally:
    manager.close()
