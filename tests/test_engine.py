"""The one training loop (`jdl.engine`), tested thoroughly on a tiny task.

The task is least squares on 64 random examples with an optax SGD state: it
compiles in a fraction of a second, so each guarantee is checked in-process.
Every real task is also wired through the engine; each has its own cheap check
(SIGTERM mid-epoch, resume, equal to an uninterrupted run) in its test file,
and the SIGKILL chain runs once, on the classifier (test_reliability.py).
"""
import ast
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from interrupts import assert_same_run, metrics, sigterm_at_step
from jdl import engine
from jdl.core import TrainState, apply_if_finite
from jdl.errors import ConfigError, Interrupted, TrainingError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 8  # 64 examples, batch 8


def least_squares(workdir, *, epochs=3, learning_rate=0.05, val=None, keep=2, patience=0,
                  nan_policy="stop", record_extra=None, log=None, note_every_s=None):
  """Opens `workdir` and runs a least-squares task; returns (state, results, lines).

  val: optional per-epoch values of the 'val_score' metric (lower is better) to
  script which epoch is best; by default the real held-out loss is used.
  """
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 4)).astype(np.float32)
  y = (x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32) + 0.1 * rng.normal(size=64)).astype(np.float32)
  x_val = rng.normal(size=(16, 4)).astype(np.float32)
  y_val = x_val @ np.array([1.0, -2.0, 0.5, 3.0], np.float32)
  model = nn.Dense(1)
  record = {"task": "least squares", "epochs": epochs, "learning_rate": learning_rate,
            "keep_checkpoints": keep, "nan_policy": nan_policy, **(record_extra or {})}
  lines = []
  with engine.workdir(str(workdir), record) as record:
    params = model.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
    state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(learning_rate))
    data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    key = jax.random.key(1)

    def step(state, inputs, index):
      data, order = inputs
      idx = jax.lax.dynamic_slice_in_dim(order, index * 8, 8)

      def loss_fn(params):
        prediction = state.apply_fn({"params": params}, data["x"][idx])[:, 0]
        return jnp.mean((prediction - data["y"][idx]) ** 2)
      loss, grads = jax.value_and_grad(loss_fn)(state.params)
      state, status, grad_norm = apply_if_finite(state, grads, loss)
      return state, {"loss": loss, "grad_norm": grad_norm, "status": status}

    def evaluate(state, train):
      prediction = state.apply_fn({"params": state.params}, x_val)[:, 0]
      val_loss = float(jnp.mean((prediction - y_val) ** 2))
      epoch = int(state.step) // STEPS_PER_EPOCH
      score = val[epoch - 1] if val is not None else val_loss
      return {"train_loss": float(train["loss"]), "val_loss": val_loss, "val_score": score}

    task = engine.Task(
        state=state, step=step,
        inputs=lambda epoch: (data, jax.random.permutation(jax.random.fold_in(key, epoch), 64)),
        steps_per_epoch=STEPS_PER_EPOCH, epochs=epochs, evaluate=evaluate,
        describe=lambda epoch, step, row: f"epoch {epoch} step {step} val {row['val_score']}",
        finish=lambda state, best, info: {"best_step": info["best_step"],
                                          "final_step": int(state.step), "kept_step": int(best.step)},
        best=("val_score", "min"), patience=patience, panels={"loss": ["train_loss", "val_loss"]},
        title="least squares", nan_policy=nan_policy, keep_checkpoints=keep,
        **({} if note_every_s is None else {"note_every_s": note_every_s}))

    def log_line(line):
      if line.startswith("epoch"):
        lines.append(line)
      if log is not None:
        log(line)
    # progress=True where a test sets note_every_s: stderr is no terminal, so lines, not a bar.
    state, results = engine.run(task, str(workdir), record, progress=note_every_s is not None,
                                log=log_line)
  return state, results, lines


def test_run_writes_everything(tmp_path):
  state, results, lines = least_squares(tmp_path / "run")
  run = tmp_path / "run"
  for name in ("config.json", "results.json", "metrics.jsonl", "learning_curves.png"):
    assert (run / name).exists(), name
  assert any(f.startswith("events") for f in os.listdir(run / "tb"))
  assert [r["epoch"] for r in metrics(str(run))] == [1, 2, 3]
  assert results["epochs_run"] == 3 and results["steps_run"] == 24 and int(state.step) == 24
  assert json.loads((run / "config.json").read_text())["task"] == "least squares"
  assert len(lines) == 3
  # Least squares learns: the held-out loss falls epoch by epoch.
  rows = metrics(str(run))
  assert rows[0]["val_loss"] > rows[1]["val_loss"] > rows[2]["val_loss"]


def test_sigterm_mid_epoch_and_between_epochs_resume_bit_exactly(tmp_path, monkeypatch):
  _, reference, _ = least_squares(tmp_path / "reference")
  sigterm_at_step(monkeypatch, 11)  # inside epoch 2
  with pytest.raises(Interrupted, match=r"stopped by SIGTERM at step 11 \(epoch 2, step 3 of 8\); "
                                        r"checkpoint saved in .*chained; rerun the same command") as e:
    least_squares(tmp_path / "chained")
  assert e.value.exit_code == 128 + 15
  sigterm_at_step(monkeypatch, 5)  # the last step of epoch 2: it ends, then the run stops
  with pytest.raises(Interrupted, match=r"after epoch 2 \(step 16\)"):
    least_squares(tmp_path / "chained")
  monkeypatch.undo()
  _, chained, _ = least_squares(tmp_path / "chained")
  assert_same_run(str(tmp_path / "reference"), str(tmp_path / "chained"))
  assert chained["best_step"] == reference["best_step"]


def test_nonfinite_steps_stop_or_are_skipped(tmp_path):
  # SGD at 1e30: step 1 is finite but enormous, step 2's loss overflows.
  with pytest.raises(TrainingError, match=r"non-finite loss at step 2 \(epoch 1\); the update was "
                                          r"not applied and no checkpoint had been saved yet"):
    least_squares(tmp_path / "stop", learning_rate=1e30)
  assert not os.path.exists(tmp_path / "stop")  # a failed start leaves nothing behind
  state, results, _ = least_squares(tmp_path / "skip", learning_rate=1e30, nan_policy="skip")
  assert [r["train_skipped_steps"] for r in metrics(str(tmp_path / "skip"))] == [7.0, 8.0, 8.0]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
  # Only step 1 was applied, so every epoch ends with the same parameters: the
  # first epoch is the best, unless its validation loss overflowed (never the best).
  rows = metrics(str(tmp_path / "skip"))
  assert results["best_epoch"] == (1 if np.isfinite(float(rows[0]["val_loss"])) else 0)


def test_best_checkpoint_outlives_the_latest_and_ties_go_to_the_first(tmp_path):
  state, results, _ = least_squares(tmp_path / "best", epochs=4, keep=1, val=[1.0, 0.5, 0.7, 0.9])
  assert results["best_epoch"] == 2 and results["kept_step"] == 16 and results["final_step"] == 32
  assert sorted(os.listdir(tmp_path / "best" / "checkpoints")) == ["16", "32"]
  _, results, _ = least_squares(tmp_path / "tie", epochs=3, keep=1, val=[0.5, 0.5, 0.5])
  assert results["best_epoch"] == 1 and results["kept_step"] == 8
  _, results, _ = least_squares(tmp_path / "nan", epochs=3, keep=1, val=[float("nan"), 2.0, 3.0])
  assert results["best_epoch"] == 2  # a non-finite metric is never the best


def test_early_stopping(tmp_path):
  lines = []
  _, results, _ = least_squares(tmp_path / "run", epochs=6, val=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                                patience=2, log=lines.append)
  assert results["epochs_run"] == 3 and results["best_epoch"] == 1 and results["kept_step"] == 8
  assert any(line.startswith("Early stopping: no better val_score for 2 epochs") for line in lines)
  # A rerun of the stopped run trains nothing more.
  _, again, _ = least_squares(tmp_path / "run", epochs=6, val=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                              patience=2)
  assert again["epochs_run"] == 3


def test_workdir_holds_the_same_run_or_is_refused(tmp_path):
  run = tmp_path / "run"
  least_squares(run, epochs=2)
  config_before, results_before = (run / "config.json").read_bytes(), (run / "results.json").read_bytes()
  # A setting that changes results: refused, and nothing on disk changes.
  with pytest.raises(ConfigError, match=r"holds a least squares run with learning_rate=0.05, not 0.1; "
                                        r"rerun with its settings to resume it, or use another --workdir"):
    least_squares(run, epochs=2, learning_rate=0.1)
  with pytest.raises(ConfigError, match=r"holds a run of epochs=2; a rerun may raise --epochs to "
                                        r"extend it, not lower it to 1"):
    least_squares(run, epochs=1)
  with pytest.raises(ConfigError, match=r"holds a least squares run, not a other run"):
    least_squares(run, epochs=2, record_extra={"task": "other"})
  assert (run / "config.json").read_bytes() == config_before
  assert (run / "results.json").read_bytes() == results_before
  # How to run may change; raising --epochs extends the run and is recorded.
  _, results, lines = least_squares(run, epochs=3, nan_policy="skip")
  assert results["epochs_run"] == 3 and len(lines) == 1
  assert json.loads((run / "config.json").read_text())["extended_from_epochs"] == [2]
  assert results["config"]["extended_from_epochs"] == [2]
  # A run of an older jdl (without a setting this one records, or without a
  # task), and an unreadable config.json.
  saved = json.loads((run / "config.json").read_text())
  del saved["learning_rate"]
  (run / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ConfigError, match=r"holds a least squares run of an older jdl, without the setting "
                                        r"learning_rate; use another --workdir"):
    least_squares(run, epochs=3)
  (run / "config.json").write_text(json.dumps({"epochs": 3}))
  with pytest.raises(ConfigError, match="holds a run of an older jdl"):
    least_squares(run, epochs=3)
  (run / "config.json").write_text("{not json")
  with pytest.raises(ConfigError, match="has an unreadable config.json"):
    least_squares(run, epochs=3)


def test_failed_start_leaves_nothing_behind_but_never_removes_old_work(tmp_path):
  with pytest.raises(RuntimeError):
    with engine.workdir(str(tmp_path / "new"), {"task": "t", "epochs": 1}):
      raise RuntimeError("the data did not load")
  assert not os.path.exists(tmp_path / "new")
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "notes.txt").write_text("mine")
  with pytest.raises(RuntimeError):
    with engine.workdir(str(tmp_path / "old"), {"task": "t", "epochs": 1}):
      raise RuntimeError("the data did not load")
  assert (tmp_path / "old" / "notes.txt").read_text() == "mine"
  blocked = tmp_path / "file"
  blocked.write_text("not a directory")
  with pytest.raises(ConfigError, match="is not writable"):
    with engine.workdir(str(blocked / "run"), {"task": "t", "epochs": 1}):
      pass


def test_curves_have_whole_number_epochs_and_panels_their_own_axis(tmp_path, monkeypatch):
  from jdl import plots
  figures = []
  save = plots._save
  monkeypatch.setattr(plots, "_save", lambda fig, path, title="": figures.append(fig) or save(fig, path, title))
  history = [{"epoch": 1, "loss": 2.0, "train_time_s": 3.5, "acc": 0.5},
             {"epoch": 2, "loss": 1.0, "train_time_s": 7.0, "acc": 0.7}]
  plots.plot_panels(history, str(tmp_path / "c.png"),
                    {"loss": ["loss"], "acc against time": {"x": "train_time_s", "keys": ["acc"]}})
  loss_ax, time_ax = figures[0].axes
  assert all(float(t).is_integer() for t in loss_ax.get_xticks())  # no epoch 1.5 on a 2-epoch run
  assert time_ax.get_xlabel() == "training seconds"
  assert list(time_ax.lines[0].get_xdata()) == [3.5, 7.0]


def test_no_progress_bar_frames_when_output_is_not_a_terminal(tmp_path, capfd):
  least_squares(tmp_path / "run")
  # (Under pytest stderr is a pipe, as in a log file or CI: one line per epoch, no bar.)
  err = capfd.readouterr().err
  assert "\r" not in err and "it/s" not in err and "ex/s" not in err


def test_a_log_file_gets_progress_lines_inside_long_epochs(tmp_path, capfd):
  notes = []
  least_squares(tmp_path / "run", epochs=2, note_every_s=0, log=notes.append)
  notes = [line for line in notes if "/8," in line]
  # After every step but the epoch's last (that one has the epoch's own line).
  assert [line.split(",")[0] for line in notes[:7]] == [f"epoch 1/2: step {i}/8" for i in range(1, 8)]
  assert len(notes) == 14 and notes[7].startswith("epoch 2/2: step 1/8, loss ")
  # The first step compiles, so its rate is unknown; later lines give it and the time left.
  assert "s/step" not in notes[0] and notes[1].endswith("s left in the epoch") and " s/step, about " in notes[1]
  # The rate has three significant figures on every line, trailing zeros kept ("4.00", not "4").
  rates = [line.split(" s/step")[0].rsplit(", ", 1)[1] for line in notes if "s/step" in line]
  assert len(rates) == 13 and all(len(r.replace(".", "").lstrip("0")) == 3 for r in rates), rates
  # The running loss is the mean so far, as the bar's: it falls as least squares learns.
  losses = [float(line.split("loss ")[1].split(",")[0]) for line in notes[:7]]
  assert losses[-1] < losses[0]
  assert "\r" not in capfd.readouterr().err
  # Once every 300 s (the default), a short run logs none.
  quiet = []
  least_squares(tmp_path / "quiet", epochs=1, note_every_s=300.0, log=quiet.append)
  assert not [line for line in quiet if "/8," in line]


def _jdl_imports():
  """{module: set of jdl modules it imports at module level} for every module of jdl."""
  graph = {}
  for root, _, files in os.walk(os.path.join(ROOT, "jdl")):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(root, name)
      module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
      imports = set()
      for node in ast.parse(open(path).read()).body:  # module level only
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jdl"):
          imports.add(node.module)
          imports.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
          imports.update(a.name for a in node.names if a.name.startswith("jdl"))
      graph[module] = imports
  return {m: {i for i in deps if i in graph and i != m} for m, deps in graph.items()}


def test_import_graph_has_no_cycle_and_the_core_imports_no_task():
  graph = _jdl_imports()
  tasks = {"jdl.train", "jdl.seeds", "jdl.gan.loop", "jdl.colorize", "jdl.text", "jdl.transfer"}
  for module in ("jdl.core", "jdl.engine", "jdl.checkpoint", "jdl.logs"):
    assert not graph[module] & tasks, (module, graph[module] & tasks)
  visiting, done = [], set()

  def visit(module):
    if module in done:
      return
    assert module not in visiting, " -> ".join(visiting[visiting.index(module):] + [module])
    visiting.append(module)
    for dep in graph[module]:
      if not (dep.startswith(module + ".") or module.startswith(dep + ".")):  # package <-> its parts
        visit(dep)
    visiting.pop()
    done.add(module)
  for module in graph:
    visit(module)
