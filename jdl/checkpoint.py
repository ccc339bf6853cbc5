"""Checkpoints with Orbax: the latest N for resume, and the best one apart.

Layout in a workdir:
  checkpoints/<step>/   the latest `keep` states (params, batch_stats, opt_state,
                        step) plus JSON loop metadata (epoch, early-stopping
                        bookkeeping) -- enough to resume exactly;
  best/<step>/          the state with the best validation accuracy so far.
Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a run killed mid-write leaves no half checkpoint behind. Nothing
here uses pickle: arrays go to TensorStore/OCDBT, metadata to JSON.
"""
import os
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True,
      # Synchronous saves: a save has finished when `save` returns, which keeps
      # resume semantics simple; a save costs ~50 ms for the notes' cnn on CPU.
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class Checkpoints:
  """The latest-N and best checkpoints of one workdir.

  Arguments:
    workdir: the run's directory.
    keep: how many of the latest checkpoints to keep.
  """

  def __init__(self, workdir: str, keep: int = 2):
    self.latest = _manager(os.path.join(workdir, "checkpoints"), keep)
    self.best = _manager(os.path.join(workdir, "best"), 1)

  @staticmethod
  def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Saves `state` (any pytree of arrays) and JSON `meta` under `step`."""
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()

  @staticmethod
  def restore(manager: ocp.CheckpointManager, target: Any,
              step: Optional[int] = None) -> Optional[Tuple[Any, dict]]:
    """Restores into the structure of `target`; None when there is no checkpoint.

    Arguments:
      manager: `self.latest` or `self.best`.
      target: a pytree with the shapes and dtypes to restore (e.g. a fresh state).
      step: which checkpoint; the newest when None.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def close(self) -> None:
    self.latest.close()
    self.best.close()
