"""Checkpoints with Orbax: the latest N for resume, and the best one apart.

Layout in a workdir:
  checkpoints/<step>/   the latest `keep` states (params, batch_stats, opt_state,
                        step) plus JSON loop metadata (epoch, early-stopping
                        bookkeeping) -- enough to resume exactly;
  best/<step>/          the state with the best validation accuracy so far.
Orbax writes each checkpoint to `<step>.orbax-checkpoint-tmp-*` and renames it
when complete, so a run killed mid-write leaves no half checkpoint under a
step name; the leftover temporary directory is removed when the workdir is
next opened. Nothing here uses pickle: arrays go to TensorStore/OCDBT,
metadata to JSON.

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

from jdl.errors import CheckpointError
from jdl.optim import path_of


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True,
      # Leftovers of a save killed before its rename; never a usable checkpoint.
      cleanup_tmp_directories=True,
      # Synchronous saves: a save has finished when `save` returns, which keeps
      # resume semantics simple; a save costs ~50 ms for the notes' cnn on CPU.
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(
      os.path.abspath(directory), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


def shapes_by_path(tree) -> Dict[str, Tuple[Tuple[int, ...], str]]:
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


class Checkpoints:
  """The latest-N and best checkpoints of one workdir.

  Arguments:
    workdir: the run's directory.
    keep: how many of the latest checkpoints to keep.
  """

  def __init__(self, workdir: str, keep: int = 2):
    self.latest = _manager(os.path.join(workdir, "checkpoints"), keep)
    self.best = _manager(os.path.join(workdir, "best"), 1)

  def save_latest(self, step: int, state: Any, meta: dict) -> None:
    save(self.latest, step, state, meta)

  def save_best(self, step: int, state: Any, meta: dict) -> None:
    save(self.best, step, state, meta)

  def restore_latest(self, target: Any) -> Optional[Tuple[Any, dict]]:
    return restore(self.latest, target)

  def restore_best(self, target: Any) -> Optional[Tuple[Any, dict]]:
    return restore(self.best, target)

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Saves `state` (any pytree of arrays) and JSON `meta` under `step`.

  A checkpoint already at `step` is replaced: after a resume the same step is
  recomputed (bit-identically on CPU) and saved again.
  """
  if step in manager.all_steps():
    manager.delete(step)
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, target: Any,
            step: Optional[int] = None) -> Optional[Tuple[Any, dict]]:
  """Restores into the structure of `target`; None when there is no checkpoint.

  Arguments:
    manager: e.g. `Checkpoints.latest` or `Checkpoints.best`.
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


def restore_arrays(directory: str) -> Optional[Tuple[Tuple[Any, dict], int]]:
  """The newest checkpoint in `directory` as stored (nested dicts of arrays).

  For reading another run's weights without knowing its exact structure (e.g.
  its class count, for transfer learning); nothing in `directory` is changed.
  Returns ((state, meta), step), or None when there is no checkpoint.
  """
  manager = ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(create=False, read_only=True),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  try:
    step = manager.latest_step()
    if step is None:
      return None
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
