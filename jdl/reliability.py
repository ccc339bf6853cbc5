"""What keeps a training run's work safe, shared by every loop (issue 7).

  keep_if, step_status  inside the jitted step: a step with a non-finite loss
                        or gradient is not applied, and says which it was.
  StepChecker           on the host: reads those statuses a few steps behind
                        the dispatch, so there is no sync per step, and stops
                        the run (nan_policy 'stop') naming the first bad step.
  save_mid_epoch        checkpoints a run stopped inside an epoch, with its
                        position and partial sums, for the rerun.
  StopSignals           SIGTERM / SIGINT become a request the loop honours
                        between steps: it checkpoints and raises Interrupted.
"""
import collections
import signal
import threading
from typing import Optional

import jax
import jax.numpy as jnp

from jdl.errors import Interrupted, TrainingError

# Steps the host may dispatch ahead of the device. Two keep the device busy
# while the progress bar, throughput and ETA track finished work.
PIPELINE_DEPTH = 2


def keep_if(ok, new, old):
  """`new` where the scalar `ok` is true, else `old`, leaf by leaf (inside jit: a select per leaf)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def step_status(loss, grad_norm):
  """(ok, status) of one step: status int32 0 good, 1 non-finite loss, 2 finite loss but
  non-finite gradients (`grad_norm` is their global norm, non-finite if any is)."""
  loss_finite = jnp.isfinite(loss)
  ok = loss_finite & jnp.isfinite(grad_norm)
  return ok, jnp.where(ok, 0, jnp.where(loss_finite, 2, 1)).astype(jnp.int32)


class StepChecker:
  """Waits on dispatched steps' statuses a few steps behind, so the host notices
  a non-finite step without a sync per step; under nan_policy 'stop' the first
  bad one raises TrainingError naming it.

  push(step, status) after dispatching a step; flush() before anything that
  must see every step checked (a checkpoint, the end of an epoch). `on_done`
  is called once per checked step (the progress bar). `hint` ends the message.
  """

  def __init__(self, nan_policy: str, epoch: Optional[int], workdir: str, on_done=None,
               hint: str = "Lower --learning_rate, set --clip_norm, or pass --nan_policy=skip "
                           "to skip such steps"):
    self.nan_policy, self.epoch, self.workdir, self.hint = nan_policy, epoch, workdir, hint
    self.on_done = on_done or (lambda: None)
    self.in_flight = collections.deque()  # (step number, status) of dispatched steps

  def push(self, step: int, status) -> None:
    self.in_flight.append((step, status))
    while len(self.in_flight) > PIPELINE_DEPTH:
      self._check(*self.in_flight.popleft())

  def flush(self) -> None:
    while self.in_flight:
      self._check(*self.in_flight.popleft())

  def _check(self, step: int, status) -> None:
    status = int(status)  # Blocks until that step has run.
    self.on_done()
    if status and self.nan_policy == "stop":
      what = "loss" if status == 1 else "gradients (the loss was finite)"
      raise TrainingError(
          f"non-finite {what} at step {step}{'' if self.epoch is None else f' (epoch {self.epoch})'}; "
          "the update was not applied and "
          f"the last checkpoint in {self.workdir} is unaffected. {self.hint}")


def save_mid_epoch(ckpts, state, meta: dict, step_in_epoch: int, sums, seconds: float) -> None:
  """Checkpoints a run stopped inside an epoch, so that a rerun continues from
  this step: the state, with the epoch's position (`step_in_epoch`, the
  steps done), its metric sums so far and `seconds` more of training time in
  `meta`. `ckpts` is a `jdl.checkpoint.Checkpoints`."""
  meta.update(step_in_epoch=step_in_epoch,
              partial_sums={k: float(v) for k, v in jax.device_get(sums).items()})
  meta["train_time_s"] += seconds
  ckpts.save_latest(int(state.step), state, meta)


class StopSignals:
  """Turns SIGTERM and SIGINT into a request the loop honours between steps.

  The loop checkpoints the step it has reached and raises `Interrupted`, so a
  preempted or Ctrl-C'd run loses nothing. A second SIGINT stops at once
  (KeyboardInterrupt). Outside the main thread signals cannot be caught, and
  this does nothing.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def interrupted(self, where: str, workdir: str) -> Interrupted:
    """The Interrupted a loop raises once it has saved its checkpoint: it names
    the signal, `where` the run stopped ('at step 12 (epoch 2)') and the workdir."""
    return Interrupted(f"stopped by {signal.Signals(self.signum).name} {where}; checkpoint saved in "
                       f"{workdir}; rerun the same command to continue", self.signum)

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    return False
