"""The one training loop: every task (classification, many seeds, the GAN,
colorization, the text model) runs through `run`.

A task supplies plain values and functions in a `Task`: its initial state, one
pure step, the inputs of each epoch, its evaluation, its log line and its
results. Everything else is here, written once:

  workdir          creates WORKDIR, or checks that it holds the same run (every
                   setting that changes results, as the task's config.json
                   record says; raising --epochs extends a run and is
                   recorded), and writes config.json; removes a directory it
                   created if the run fails before its first checkpoint.
  run              the loop, top to bottom: restore the latest checkpoint; per
                   epoch the jitted steps with progress, the non-finite check
                   and the stop flag (SIGTERM/SIGINT: checkpoint and exit);
                   then evaluation, metrics row, best and latest checkpoints,
                   early stopping; at the end the task's results, learning
                   curves and results.json.
  StepChecker, StopSignals
                   the host side of the non-finite guard and of signals.

Randomness stays the task's: its step folds its key with state.step and its
inputs are a pure function of the epoch, so a resumed run replays exactly the
batches, augmentations and dropout masks it would have seen.
"""
import collections
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jdl import checkpoint, parallel, plots, xla
from jdl.config import make_writable_dir
from jdl.errors import ConfigError, Interrupted, TrainingError
from jdl.logs import MetricWriter, write_json

# Steps the host may dispatch ahead of the device. Two keep the device busy
# while the progress bar, throughput and ETA track finished work.
PIPELINE_DEPTH = 2

# Settings that say how to run, not what is learned: a rerun may change them.
HOW_TO_RUN = ("workdir", "data_dir", "download", "keep_checkpoints", "log_every", "nan_policy")


def default_workdir(*parts: str, seed: int) -> str:
  """runs/PART1-PART2-seedS: where a run goes without --workdir."""
  return "runs/" + "-".join(str(p).replace("/", "_") for p in parts) + f"-seed{seed}"


# ----------------------------------------------------------------------------
# The run directory.
# ----------------------------------------------------------------------------

def _has_checkpoint(directory: str) -> bool:
  """Whether any checkpoint (a step directory under a 'checkpoints' folder) lies below."""
  for root, dirs, _ in os.walk(directory):
    if os.path.basename(root) == "checkpoints" and any(d.isdigit() for d in dirs):
      return True
  return False


def _differences(previous: dict, record: dict, may_change: Sequence[str]) -> List[str]:
  """The keys whose values differ, in the record's order (the config's fields first)."""
  keys = [k for k in {**record, **previous} if k not in may_change and not k.startswith("extended_")]
  return [k for k in keys if previous.get(k) != record.get(k)]


@contextlib.contextmanager
def workdir(path: str, record: dict, *, may_change: Sequence[str] = (), extendable: str = "epochs"):
  """Opens a run directory for the run `record` describes; a context manager.

  Creates `path`, or checks that the run it holds is this one: every key of
  config.json but `HOW_TO_RUN`, `may_change` and `extendable` must be equal,
  and `extendable` (epochs, or the text model's steps) may only grow; a
  grown one is recorded in config.json as `extended_from_<name>`. Then writes
  `record` to config.json. A directory this call created is removed again if
  the body fails before any checkpoint is saved, so a failed start leaves
  nothing behind.

  Yields the record as written (lists for tuples, with `extended_from_*`):
  the run's results carry it as 'config'.

  Arguments:
    path: the workdir.
    record: the config.json content: the config's fields plus 'task' and any
      fields derived from the data (input shape, classes, statistics).
    may_change: more keys a rerun may change (e.g. sampling settings).
    extendable: the key a rerun may raise.
  Raises:
    ConfigError: one line, before anything is written, if the directory is not
      writable or holds another run.
  """
  path = os.path.expanduser(path)
  created = not os.path.exists(path)
  make_writable_dir(path)
  config_path = os.path.join(path, "config.json")
  record = json.loads(json.dumps(record, default=str))  # as config.json will hold it: lists, not tuples
  if os.path.exists(config_path) and _has_checkpoint(path):
    try:
      with open(config_path) as f:
        previous = json.load(f)
    except (OSError, ValueError) as e:
      raise ConfigError(f"workdir {path} has an unreadable config.json ({e}); use another --workdir") from None
    if "task" not in previous:
      raise ConfigError(f"workdir {path} holds a run of an older jdl (its config.json names no task); "
                        "use another --workdir")
    if previous["task"] != record["task"]:
      raise ConfigError(f"workdir {path} holds a {previous['task']} run, not a {record['task']} run; "
                        "use another --workdir")
    differ = _differences(previous, record, (*HOW_TO_RUN, *may_change, extendable))
    if differ:
      key = differ[0]
      more = f" (and {len(differ) - 1} more: {', '.join(differ[1:])})" if len(differ) > 1 else ""
      if key not in previous:  # a setting this jdl has and the one that made the run had not
        raise ConfigError(f"workdir {path} holds a {record['task']} run of an older jdl, without the "
                          f"setting {key}{more}; use another --workdir")
      raise ConfigError(f"workdir {path} holds a {record['task']} run with {key}={previous.get(key)!r}, "
                        f"not {record.get(key)!r}{more}; rerun with its settings to resume it, "
                        "or use another --workdir")
    old, new = previous.get(extendable), record.get(extendable)
    if new < old:
      raise ConfigError(f"workdir {path} holds a run of {extendable}={old}; a rerun may raise "
                        f"--{extendable} to extend it, not lower it to {new}; use another --workdir")
    history = list(previous.get(f"extended_from_{extendable}", []))
    if new > old:
      history.append(old)
    if history:
      record[f"extended_from_{extendable}"] = history
  write_json(config_path, record)
  try:
    yield record
  except BaseException:
    if created and parallel.is_primary() and not _has_checkpoint(path):
      shutil.rmtree(path, ignore_errors=True)  # A failed start leaves nothing behind.
    raise


# ----------------------------------------------------------------------------
# Signals and the non-finite check, on the host.
# ----------------------------------------------------------------------------

class StepChecker:
  """Waits on dispatched steps' statuses a few steps behind, so the host notices
  a non-finite step without a sync per step; under nan_policy 'stop' the first
  bad one raises TrainingError naming it.

  push(step, status) after dispatching a step; flush() before anything that
  must see every step checked (a checkpoint, the end of an epoch). `on_done`
  is called once per checked step (the progress bar). A status is an int32
  scalar, or one per replica ((N,), `jdl.seeds`).
  """

  def __init__(self, nan_policy: str, where: Callable[[int], str], workdir: str, saved: bool,
               hint: str, on_done=None):
    self.nan_policy, self.where, self.workdir, self.hint = nan_policy, where, workdir, hint
    self.saved = saved  # whether the workdir holds a checkpoint to fall back on
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
    status = np.asarray(status)  # Blocks until that step has run.
    self.on_done()
    if status.any() and self.nan_policy == "stop":
      bad = int(np.flatnonzero(status.ravel())[0])
      replica = f" in replica {bad}" if status.ndim else ""
      what = "loss" if status.ravel()[bad] == 1 else "gradients (the loss was finite)"
      saved = (f"the last checkpoint in {self.workdir} is unaffected" if self.saved
               else "no checkpoint had been saved yet")
      raise TrainingError(f"non-finite {what} at step {step} ({self.where(step)}){replica}; the "
                          f"update was not applied and {saved}. {self.hint}")


class StopSignals:
  """Turns SIGTERM and SIGINT into a request the loop honours between steps.

  The loop checkpoints the step it has reached and raises `Interrupted`, so a
  preempted or Ctrl-C'd run loses nothing. A second SIGINT stops at once
  (KeyboardInterrupt). Outside the main thread signals cannot be caught, and
  this does nothing. On several hosts SIGTERM is left to JAX's preemption
  service, which makes every process save at the same step
  (`Checkpoints.reached_preemption`).
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
      signals = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
      for signum in signals:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def interrupted(self, where: str, workdir: str) -> Interrupted:
    """The Interrupted a loop raises once it has saved its checkpoint: it names
    the signal, `where` the run stopped ('at step 12 (epoch 2)') and the workdir."""
    signum = self.signum or signal.SIGTERM  # None: the preemption sync point
    return Interrupted(f"stopped by {signal.Signals(signum).name} {where}; checkpoint saved in "
                       f"{workdir}; rerun the same command to continue", signum)

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    return False


# ----------------------------------------------------------------------------
# The task and the loop.
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Task:
  """What a kind of run gives the loop: plain values and functions, no hooks.

  Arguments:
    state: the initial state, a pytree with a `.step` counter, already placed
      on the devices (a checkpoint is restored into its structure and shardings).
    step: (state, inputs, index) -> (state, metrics): one pure update, jitted by
      `run` once with the state donated. `metrics` holds scalars (or (N,) for
      stacked replicas) averaged over the epoch's good steps, and 'status'
      (int32 from `core.step_status`: a bad step must change nothing but
      state.step).
    inputs: epoch -> the pytree `step` reads during that epoch (the data on the
      device, the epoch's order, keys): arguments, not constants, so programs
      are cached across datasets of the same shapes.
    steps_per_epoch: steps of a full epoch.
    epochs: epochs of the run.
    evaluate: (state, train) -> the epoch's metrics row; `train` holds the
      step metrics averaged over the epoch's good steps (NumPy values).
    describe: (epoch, step, row) -> the epoch's one log line.
    finish: (state, best, info) -> results: the final state, the best one
      (the final one when no best is tracked) and `info` (the loop's
      bookkeeping: epochs_run, steps_run, best_epoch, best_step, best_value,
      stopped_early, compile_s, train_time_s, history).
    total_steps: where the run ends (default epochs * steps_per_epoch; the
      text model's last epoch may be shorter).
    best: (row key, 'max' or 'min'): keep the best checkpoint by it, restore it
      for `finish`; None: the final state is the result.
    patience: stop after this many epochs without a better best (0: never).
    pictures: (state, epoch) -> {tag: PNG path} written this epoch, shown in
      TensorBoard's images tab.
    panels: learning_curves.png: {panel title: [row keys]}, or a panel's own
      horizontal axis as {'x': row key, 'keys': [row keys]}.
    x: the curves' horizontal axis, 'epoch' or 'step'.
    title: the run in words, for the curves ('cnn on shapes').
    period: what an epoch is called in messages ('epoch').
    examples_per_step: the batch size: the bar counts examples and the row
      gets examples_per_s (0: the bar counts steps).
    bar_metric: (step metric, label, scale): the progress bar's running mean.
    nan_policy: 'stop' or 'skip' (see `StepChecker`).
    keep_checkpoints: how many of the latest checkpoints to keep.
    nan_hint: the advice ending a non-finite-step error.
    log_every: steps between the progress bar's loss updates (each a sync).
    note_every_s: where there is no bar (a log file), seconds between progress
      lines inside an epoch (each a sync); 0: after every step.
    mesh: the device mesh the steps run under (`parallel.within`), or None.
  """
  state: Any
  step: Callable
  inputs: Callable[[int], Any]
  steps_per_epoch: int
  epochs: int
  evaluate: Callable[[Any, Dict[str, Any]], Dict[str, float]]
  describe: Callable[[int, int, Dict[str, float]], str]
  finish: Callable[[Any, Any, Dict[str, Any]], dict]
  total_steps: Optional[int] = None
  best: Optional[Tuple[str, str]] = None
  patience: int = 0
  pictures: Optional[Callable[[Any, int], Dict[str, str]]] = None
  panels: Dict[str, List[str]] = dataclasses.field(default_factory=dict)
  x: str = "epoch"
  title: str = ""
  period: str = "epoch"
  examples_per_step: int = 0
  bar_metric: Tuple[str, str, float] = ("loss", "loss", 1.0)
  nan_policy: str = "stop"
  keep_checkpoints: int = 2
  nan_hint: str = "Lower --learning_rate, or pass --nan_policy=skip to skip such steps"
  log_every: int = 50
  note_every_s: float = 300.0
  mesh: Any = None


def _accumulating(step: Callable) -> Callable:
  """The jitted function the loop calls: `step`, then the epoch's metric sums.

  (state, sums, inputs, index) -> (state, sums, status): `sums` adds each
  metric of a good step and counts the bad ones in 'skipped'; `status` is not
  donated onwards, so the loop can wait on it a couple of steps behind.
  """
  def fn(state, sums, inputs, index):
    state, metrics = step(state, inputs, index)
    metrics = dict(metrics)
    status = metrics.pop("status")
    bad = status > 0
    new = {k: sums[k] + jnp.where(bad, 0.0, v.astype(jnp.float32)) for k, v in metrics.items()}
    new["skipped"] = sums["skipped"] + bad.astype(jnp.float32)
    return state, new, status
  return xla.jit(fn, donate_argnums=(0, 1))


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.array([jnp.isfinite(x).all() for x in leaves]))


def _sum_shapes(task: Task, state) -> dict:
  """{metric: shape} of one step's metrics (scalars, or (N,) per replica), plus 'skipped'."""
  _, metrics = parallel.within(task.mesh, jax.eval_shape)(task.step, state, task.inputs(1), 0)
  shapes = {k: v.shape for k, v in metrics.items()}
  shapes["skipped"] = shapes.pop("status")
  return shapes


def _step_of(state) -> int:
  """The state's step counter (stacked replicas count alike)."""
  return int(np.max(np.asarray(jax.device_get(state.step))))


def _progress_bar(task: Task, epoch: int, last_epoch: int, first: int, steps: int, show: bool):
  """tqdm over the epoch's steps (or examples), only on a terminal: in a log
  file the epoch's one log line is the progress."""
  from tqdm import tqdm
  unit = task.examples_per_step or 1
  return tqdm(total=steps * unit, initial=first * unit, unit="ex" if task.examples_per_step else "step",
              unit_scale=bool(task.examples_per_step), desc=f"{task.period} {epoch}/{last_epoch}",
              disable=not (show and sys.stderr.isatty()), leave=False, file=sys.stderr,
              mininterval=0.5)


def _running_mean(task: Task, sums: dict, done: int) -> float:
  """The bar's metric (`task.bar_metric`) averaged over the epoch's good steps
  among the first `done`: what the bar and a log file's progress lines show."""
  key, _, scale = task.bar_metric
  good = np.maximum(done - np.asarray(sums["skipped"]), 1)
  return float(np.mean(np.asarray(sums[key]) / good) * scale)


def _note(task: Task, epoch: int, last_epoch: int, done: int, steps: int, sums: dict,
          seconds_per_step: Optional[float]) -> str:
  """The progress line a log file gets inside a long epoch: steps done, the
  running mean of the bar's metric, and the time the epoch still needs."""
  line = (f"{task.period} {epoch}/{last_epoch}: step {done}/{steps}, "
          f"{task.bar_metric[1]} {_running_mean(task, sums, done):.4f}")
  if seconds_per_step:
    seconds_left = (steps - done) * seconds_per_step
    left = f"{seconds_left / 60:.0f} min" if seconds_left >= 90 else f"{seconds_left:.0f} s"
    rate = f"{seconds_per_step:#.3g}".rstrip(".")  # 3 figures, zeros kept: 4.00, not 4
    line += f", {rate} s/step, about {left} left in the {task.period}"
  return line


def run(task: Task, workdir: str, record: dict, *, progress: bool = True, log=print):
  """Trains `task` in `workdir`, resuming from its latest checkpoint.

  Arguments:
    task: the Task.
    workdir: the run directory, opened by `workdir(...)` with `record`.
    record: the run's config.json content, also the results' 'config'.
    progress: show a progress bar where stderr is a terminal, and elsewhere a
      progress line every `task.note_every_s` inside an epoch.
    log: where status lines go (print by default).
  Returns:
    (state, results): the best state (the final one when no best is tracked)
    and `task.finish`'s results, plus config, epochs_run, steps_run,
    train_time_s, wall_time_s and learning_curves (and best_epoch when a best
    is tracked), also written to WORKDIR/results.json.
  """
  start_time = time.time()
  spe = task.steps_per_epoch
  total_steps = task.total_steps if task.total_steps is not None else task.epochs * spe
  last_epoch = max(math.ceil(total_steps / spe), 0) if spe else 0
  best_key, best_mode = task.best or (None, None)

  # --- Resume from the latest checkpoint, if any. ---
  ckpts = checkpoint.Checkpoints(workdir, task.keep_checkpoints, best_mode)
  # Loop bookkeeping saved with every checkpoint. `epoch` counts completed
  # epochs; a checkpoint taken inside an epoch (on SIGTERM/SIGINT) also holds
  # how many steps of the next epoch are done and their metric sums.
  meta = {"epoch": 0, "step_in_epoch": 0, "partial_sums": None, "best_value": None,
          "best_epoch": 0, "best_step": None, "epochs_since_best": 0, "stopped_early": False,
          "train_time_s": 0.0}
  state = task.state
  restored = ckpts.restore_latest(state)
  if restored is not None:
    state, saved = restored
    meta.update(saved)
    inside = (f" and {meta['step_in_epoch']} steps of {task.period} {meta['epoch'] + 1}"
              if meta["step_in_epoch"] else "")
    log(f"Resuming from {workdir}: {task.period} {meta['epoch']} done{inside}, step {_step_of(state)}")
  writer = MetricWriter(workdir, meta["epoch"])

  # --- The loop: one jitted step per batch, metrics fetched at log points. ---
  train_fn = parallel.within(task.mesh, _accumulating(task.step))
  where = lambda step: f"{task.period} {(step - 1) // spe + 1}" if spe else ""
  shapes = _sum_shapes(task, state) if meta["epoch"] < last_epoch else {}
  # Counted on the host (every step, skipped or not, moves state.step by one), so
  # that dispatching the next step never waits for this one.
  step = _step_of(state)
  compile_s = None
  with StopSignals() as stop:
    for epoch in range(meta["epoch"] + 1, last_epoch + 1):
      if meta["stopped_early"]:
        break
      epoch_start = time.time()
      steps = min(spe, total_steps - (epoch - 1) * spe)
      first = meta["step_in_epoch"]  # > 0 only when resuming inside this epoch
      inputs = task.inputs(epoch)
      sums = {k: jnp.asarray((meta["partial_sums"] or {}).get(k, np.zeros(shape)), jnp.float32)
              for k, shape in shapes.items()}
      with _progress_bar(task, epoch, last_epoch, first, steps, progress) as bar:
        checker = StepChecker(task.nan_policy, where, workdir, restored is not None or epoch > 1,
                              task.nan_hint,
                              on_done=lambda: bar.update(task.examples_per_step or 1))
        # The rate behind a log file's progress lines: steps since (since_time, since_index), after compiling.
        noted = since_time = time.time()
        since_index = first
        for index in range(first, steps):
          state, sums, status = train_fn(state, sums, inputs, index)
          if compile_s is None:
            jax.block_until_ready(sums)  # Once: separates compile time from step time.
            compile_s = time.time() - epoch_start
            since_time, since_index = time.time(), index + 1
          step += 1
          checker.push(step, status)
          preempted = ckpts.reached_preemption(step)  # several hosts: all agree on this step
          if stop.signum or preempted or index + 1 == steps:
            checker.flush()  # a bad step stops here, before its state could be saved
          if not bar.disable and (index + 1) % task.log_every == 0:
            bar.set_postfix({task.bar_metric[1]: f"{_running_mean(task, sums, index + 1):.4f}"})
          if (progress and bar.disable and index + 1 < steps
              and time.time() - noted >= task.note_every_s):
            noted = time.time()
            rate = ((noted - since_time) / (index + 1 - since_index)
                    if index + 1 > since_index else None)
            log(_note(task, epoch, last_epoch, index + 1, steps, jax.device_get(sums), rate))
          if (stop.signum or preempted) and index + 1 < steps:
            meta.update(step_in_epoch=index + 1, partial_sums=jax.tree.map(
                lambda v: np.asarray(v).tolist(), jax.device_get(sums)))
            meta["train_time_s"] += time.time() - epoch_start
            ckpts.save(step, state, meta)
            raise stop.interrupted(f"at step {step} ({task.period} {epoch}, step {index + 1} of "
                                   f"{steps})", workdir)

      # --- End of epoch: evaluate, log, keep the best and the latest. ---
      sums = jax.device_get(sums)
      skipped = np.asarray(sums.pop("skipped"), np.float64)
      good = np.maximum(steps - skipped, 1)
      train = {k: np.asarray(v, np.float64) / good for k, v in sums.items()}
      row = dict(task.evaluate(state, train))
      epoch_time = time.time() - epoch_start
      row["epoch_time_s"] = epoch_time
      if task.examples_per_step:
        row["examples_per_s"] = (steps - first) * task.examples_per_step / epoch_time
      if task.nan_policy == "skip":
        row["train_skipped_steps"] = float(np.sum(skipped))
      value = None
      if best_key is not None:
        # A model with non-finite parameters or metrics (e.g. validation loss) is never the best.
        finite_row = all(math.isfinite(v) for v in row.values() if isinstance(v, float))
        if finite_row and bool(_all_finite(state)):
          value = float(row[best_key])
        better = value is not None and (meta["best_value"] is None or (
            value > meta["best_value"] if best_mode == "max" else value < meta["best_value"]))
        if better:
          meta.update(best_value=value, best_epoch=epoch, best_step=step, epochs_since_best=0)
        else:
          meta["epochs_since_best"] += 1
      meta.update(epoch=epoch, step_in_epoch=0, partial_sums=None)
      meta["train_time_s"] += epoch_time
      row["train_time_s"] = meta["train_time_s"]  # seconds so far: a time-to-accuracy axis
      meta["stopped_early"] = bool(task.patience and meta["epochs_since_best"] >= task.patience)
      writer.write(step, epoch, row)
      for tag, png in (task.pictures(state, epoch) if task.pictures else {}).items():
        writer.add_image(tag, png, step)
      ckpts.save(step, state, meta, best_value=value)
      log(task.describe(epoch, step, row))
      if meta["stopped_early"]:
        log(f"Early stopping: no better {best_key} for {task.patience} {task.period}s "
            f"(best {meta['best_value']:.4g} at {task.period} {meta['best_epoch']})")
      if (stop.signum or ckpts.reached_preemption(step)) and epoch < last_epoch:
        raise stop.interrupted(f"after {task.period} {epoch} (step {step})", workdir)

  # --- The results. ---
  best = ckpts.restore_best(state) if best_key is not None else None
  writer.close()
  ckpts.close()
  info = {"epochs_run": meta["epoch"], "steps_run": _step_of(state), "best_epoch": meta["best_epoch"],
          "best_step": meta["best_step"], "best_value": meta["best_value"], "stopped_early": meta["stopped_early"],
          "compile_s": compile_s, "train_time_s": meta["train_time_s"], "history": writer.history}
  result_state = best[0] if best is not None else state
  results = dict(task.finish(state, result_state, info))
  curves = None
  if writer.history and task.panels:
    curves = plots.plot_panels(writer.history, os.path.join(workdir, "learning_curves.png"),
                               task.panels, title=task.title, x=task.x)
  results = {"config": record, **results, "epochs_run": meta["epoch"], "steps_run": info["steps_run"],
             "train_time_s": meta["train_time_s"], "wall_time_s": time.time() - start_time,
             "learning_curves": curves}
  if best_key is not None:
    results["best_epoch"] = meta["best_epoch"]
  write_json(os.path.join(workdir, "results.json"), results)
  return result_state, results
