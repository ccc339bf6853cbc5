"""experiments.gan: the task on tiny networks: conditional on Fashion-MNIST (floors, goals, the
exported generator, --sample_only), SIGTERM and resume, non-finite steps, errors, the entrypoint."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from interrupts import assert_same_run, sigterm_at_step
from jdl import gan
from jdl.data import Dataset, load_dataset
from jdl.errors import ConfigError, Interrupted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_entrypoint_outputs(workdir, stdout, epochs):
  """What `python -m experiments.gan` must leave in `workdir` after `epochs` epochs."""
  for name in ("samples/final.png", "learning_curves.png", "metrics.jsonl", "results.json",
               "classifier/results.json", *(f"samples/epoch_{e:03d}.png" for e in range(1, epochs + 1))):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tb")))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    row = json.loads(f.readline())
  for key in ("d_loss", "g_loss", "d_real", "d_fake", "frechet_distance"):
    assert np.isfinite(row[key]), key
  assert 0 < row["d_real"] < 1 and 0 < row["d_fake"] < 1
  assert "Total params" in stdout and "Discriminator" in stdout
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["epochs_run"] == epochs and len(results["frechet_distance_by_epoch"]) == epochs
  assert "NOT comparable with Inception" in results["frechet_distance_note"]


@pytest.fixture(scope="module")
def tiny_shapes():
  return load_dataset("shapes", num_train=96, num_test=64, seed=0)


@pytest.fixture(scope="module")
def classifier_workdir(tmp_path_factory, tiny_shapes):
  """One scoring cnn for the in-process GAN runs (each would otherwise train its own)."""
  workdir = tmp_path_factory.mktemp("scorer")
  gan.train_scorer(config(workdir), tiny_shapes, str(workdir), log=lambda *a: None)
  return str(workdir / "classifier")


def config(tmp_path, **overrides):
  values = dict(num_train=96, classifier_epochs=1, num_eval=32, g_width=16, d_width=8,
                batch_size=32, latent_dim=8, epochs=1, workdir=str(tmp_path / "gan"))
  values.update(overrides)
  return gan.GANConfig(**values)


@pytest.fixture(scope="module")
def fashion_cgan(tmp_path_factory):
  """One conditional epoch on real Fashion-MNIST (28x28x1), tiny networks, its own scorer."""
  tmp_path = tmp_path_factory.mktemp("fashion")
  data = load_dataset("fashion_mnist", num_train=128, num_test=64)
  run_config = config(tmp_path, dataset="fashion_mnist", num_train=128, conditional=True)
  lines = []
  results = gan.fit(run_config, data, progress=False, log=lines.append)
  return run_config, results, "\n".join(lines)


def test_conditional_gan_on_fashion_mnist_floors_goals_and_the_exported_generator(fashion_cgan):
  run_config, results, log = fashion_cgan
  workdir = run_config.workdir
  # The generator's output follows the data: 28x28x1 from a 7x7 map, two up-samplings.
  assert results["config"]["input_shape"] == [28, 28, 1] and results["config"]["num_classes"] == 10
  assert "decoder/deconv2 (ConvTranspose)   (None, 28, 28, 1)" in log
  # The scorer is trained by Fashion-MNIST's recipe (no augmentation, no
  # validation split, cosine) for --classifier_epochs.
  scorer = json.loads(open(os.path.join(workdir, "classifier", "config.json")).read())
  assert (scorer["augment"], scorer["validation_fraction"], scorer["schedule"], scorer["epochs"]) == (
      False, 0.0, "cosine", 1)
  # The floors, next to the distance: real vs real is far below the untrained generator.
  real, initial = results["frechet_distance_real"], results["frechet_distance_initial"]
  assert 0 <= real < initial and "Fréchet distance floors" in log
  assert results["frechet_distance_best_over_real"] == pytest.approx(results["frechet_distance_best"] / real)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  first = lambda ok: next(({"epoch": r["epoch"], "train_time_s": r["train_time_s"]}
                           for r in rows if ok(r)), None)
  assert results["frechet_goal_reached"] == first(lambda r: r["frechet_distance"] <= 3 * real)
  assert results["label_match_goal_reached"] == first(lambda r: r["label_match_rate"] >= 0.85)
  # The exported generator is the best epoch's, drawn to samples/best.png.
  best = rows[results["best_epoch"] - 1]
  assert results["label_match_rate_best_epoch"] == best["label_match_rate"]
  assert results["exported_generator"]["epoch"] == results["best_epoch"] == 1
  assert os.path.exists(os.path.join(workdir, "samples", "best.png"))
  # Every class drawn from the same 200 z's: a 10 x 10 confusion matrix.
  report = results["label_report"]
  confusion = np.array(report["confusion"])
  assert confusion.shape == (10, 10) and (confusion.sum(axis=1) == 200).all()
  assert report["match_rate"] == pytest.approx(np.trace(confusion) / 2000)
  assert report["noise_effect"] > 0 and report["label_effect"] > 0
  assert results["label_match_chance"] == pytest.approx(0.1)
  # The conditional defaults: an AC-GAN class head, whose accuracies are logged.
  assert 0 <= rows[-1]["d_class_acc_real"] <= 1 and 0 <= rows[-1]["d_class_acc_fake"] <= 1
  # The sample sheet: one row per class, the same z down each column, big enough
  # to judge (28 px samples at 3x), with the class names in a margin on the left.
  from PIL import Image
  sheet = np.asarray(Image.open(os.path.join(workdir, "samples", "epoch_001.png")).convert("RGB"))
  grid_w = grid_h = 10 * 86 + 2
  assert sheet.shape[1] > grid_w + 40 and sheet.shape[0] >= grid_h
  margin = sheet[-grid_h:, :sheet.shape[1] - grid_w]
  assert (margin < 128).any() and (margin == 255).mean() > 0.8  # dark text on white
  z_grid, labels = gan.fixed_noise(run_config, 10)
  np.testing.assert_array_equal(np.asarray(labels).reshape(10, 10), np.arange(10)[:, None] * np.ones(10))
  np.testing.assert_array_equal(np.asarray(z_grid)[:10], np.asarray(z_grid)[10:20])


def test_sample_only_is_deterministic_and_draws_the_exported_generator(fashion_cgan):
  from PIL import Image
  run_config, _, _ = fashion_cgan
  sample = lambda **kw: gan.sample_only(dataclasses.replace(run_config, sample_only=True, **kw),
                                        log=lambda *a: None)
  path = sample(label=7, num=16, seed=0)
  assert path == os.path.join(run_config.workdir, "samples", "label7_seed0.png")
  first = open(path, "rb").read()
  assert open(sample(label=7, num=16, seed=0), "rb").read() == first  # same seed, same picture
  assert open(sample(label=7, num=16, seed=1), "rb").read() != first
  # Every class, 10 of each from the training sheet's noise: the very images of
  # samples/best.png, so the best checkpoint is what is drawn.
  classes = sample(num=100, seed=run_config.seed + 1)
  assert classes.endswith("classes_seed1.png")
  grid = lambda p: np.asarray(Image.open(p).convert("RGB"))[-862:, -862:]
  np.testing.assert_array_equal(grid(classes),
                                grid(os.path.join(run_config.workdir, "samples", "best.png")))


def test_sample_only_errors_are_one_line(tmp_path, fashion_cgan, capsys):
  from jdl import cli
  run_config, _, _ = fashion_cgan
  sample = lambda workdir, **kw: gan.sample_only(dataclasses.replace(
      run_config, workdir=str(workdir), sample_only=True, **kw), log=lambda *a: None)
  with pytest.raises(ConfigError, match=r"--label must be in 0..9 \(fashion_mnist: T-shirt/top, "):
    sample(run_config.workdir, label=10)
  record = json.load(open(os.path.join(run_config.workdir, "config.json")))
  for name, changes in (("unconditional", {"conditional": False}), ("colorize", {"task": "colorize"})):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "config.json").write_text(json.dumps({**record, **changes}))
  with pytest.raises(ConfigError, match="needs a conditional run; .* holds an unconditional GAN"):
    sample(tmp_path / "unconditional", label=3)
  with pytest.raises(ConfigError, match="has no checkpoint yet; train one first"):
    sample(tmp_path / "unconditional")
  assert not os.path.exists(tmp_path / "unconditional" / "checkpoints")  # nothing written
  with pytest.raises(ConfigError, match="holds a colorize run, not a GAN run"):
    sample(tmp_path / "colorize")
  with pytest.raises(ConfigError, match="--label applies to --sample_only only"):
    gan.validate_config(dataclasses.replace(run_config, label=3))
  # From the command line: one line, exit 2.
  from experiments import gan as entrypoint
  cli.define_common_flags()
  argv = ["gan", "--sample_only", f"--workdir={tmp_path / 'nothing'}"]
  flags.FLAGS.unparse_flags()
  try:
    with pytest.raises(SystemExit) as exit_info:
      cli.call(entrypoint.main, cli.parse_flags(argv))
  finally:
    flags.FLAGS.unparse_flags()
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and err.count("\n") == 1 and "holds no trained GAN" in err, err
  assert not os.path.exists(tmp_path / "nothing")


@pytest.mark.parametrize("overrides,message", [
    (dict(learning_rate=0.0), "learning_rate must be > 0"),
    (dict(beta1=1.0), "beta1 must be in"),
    (dict(num_eval=1), "num_eval must be >= 2"),
    (dict(batch_size=1000), "batch_size 1000 is larger than the training set"),
    (dict(classifier_workdir="/nonexistent/run"), "holds no experiments.cifar run"),
    (dict(g_conditioning="both"), "g_conditioning must be one of concat, multiply, batchnorm, got 'both'"),
    (dict(conditional=True, class_loss_weight=1.0, d_conditioning="input"),
     "class_loss_weight > 0 needs --d_conditioning=projection"),
    (dict(conditional=True, class_loss_weight=0.0, d_conditioning="none"),
     "--d_conditioning=none needs class_loss_weight > 0"),
])
def test_bad_gan_input_is_a_config_error(tmp_path, tiny_shapes, overrides, message):
  with pytest.raises(ConfigError, match=message):
    gan.fit(config(tmp_path, **overrides), tiny_shapes, progress=False, log=lambda *a: None)


def test_sequences_and_other_runs_are_refused(tmp_path, tiny_shapes):
  sequences = Dataset("seq", (np.zeros((64, 40, 1), np.float32), np.zeros(64, np.int32)),
                      (np.zeros((8, 40, 1), np.float32), np.zeros(8, np.int32)), 10, None)
  with pytest.raises(ConfigError, match="a GAN needs images"):
    gan.fit(config(tmp_path), sequences, progress=False, log=lambda *a: None)
  # A workdir with a checkpoint of a conditional run (the check comes before any restore).
  os.makedirs(tmp_path / "gan" / "checkpoints" / "3")
  record = {"task": "gan", **dataclasses.asdict(config(tmp_path, conditional=True)),
            "input_shape": [32, 32, 3]}
  (tmp_path / "gan" / "config.json").write_text(json.dumps(record))
  with pytest.raises(ConfigError, match="holds a gan run with conditional=True, not False"):
    gan.fit(config(tmp_path), tiny_shapes, progress=False, log=lambda *a: None)
  (tmp_path / "gan" / "config.json").write_text(json.dumps({**record, "task": "colorize"}))
  with pytest.raises(ConfigError, match="holds a colorize run, not a gan run"):
    gan.fit(config(tmp_path, conditional=True), tiny_shapes, progress=False, log=lambda *a: None)


def test_sigterm_mid_epoch_resumes_bit_exactly(tmp_path, tiny_shapes, classifier_workdir, monkeypatch):
  """The GAN is wired through the engine: stopped inside epoch 2, resumed, equal to one run."""
  quiet = dict(progress=False, log=lambda *a: None)
  make = lambda name: config(tmp_path / name, epochs=2, classifier_workdir=classifier_workdir)
  reference = gan.fit(make("reference"), tiny_shapes, **quiet)
  sigterm_at_step(monkeypatch, 4)  # 96 images, batch 32: step 4 is the first of epoch 2
  with pytest.raises(Interrupted, match=r"stopped by SIGTERM at step 4 \(epoch 2, step 1 of 3\)"):
    gan.fit(make("chained"), tiny_shapes, **quiet)
  monkeypatch.undo()
  lines = []
  chained = gan.fit(make("chained"), tiny_shapes, progress=False, log=lines.append)
  assert any("epoch 1 done and 1 steps of epoch 2, step 4" in line for line in lines)
  assert_same_run(str(tmp_path / "reference" / "gan"), str(tmp_path / "chained" / "gan"))
  assert reference["frechet_distance_by_epoch"] == chained["frechet_distance_by_epoch"]
  assert reference["final_losses"] == chained["final_losses"]


def test_gan_entrypoint_smoke(tmp_path):
  workdir = str(tmp_path / "run")
  result = subprocess.run(
      [sys.executable, "-m", "experiments.gan", "--num_train=128", "--num_eval=64", "--g_width=16",
       "--d_width=8", "--batch_size=32", "--latent_dim=8", "--epochs=2", "--classifier_epochs=1",
       f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  check_entrypoint_outputs(workdir, result.stdout, epochs=2)
  # A scorer this weak (one epoch on 128 images) is flagged.
  assert "WARNING: the scoring classifier is only" in result.stdout
  assert "train it longer" in json.load(open(os.path.join(workdir, "results.json")))["scoring_classifier_warning"]


def test_unwritable_workdirs_are_one_line_errors(tmp_path, tiny_shapes):
  from jdl import colorize
  blocked = tmp_path / "blocked"
  blocked.write_text("a file where the workdir's parent should be")
  with pytest.raises(ConfigError, match="is not writable"):
    gan.fit(config(tmp_path, workdir=str(blocked / "run")), tiny_shapes, progress=False,
            log=lambda *a: None)
  with pytest.raises(ConfigError, match="is not writable"):
    colorize.fit(colorize.ColorizeConfig(width=8, batch_size=16, workdir=str(blocked / "run")),
                 tiny_shapes, progress=False, log=lambda *a: None)


def test_nonfinite_steps_stop_or_are_skipped(tmp_path, tiny_shapes, classifier_workdir):
  from jdl.errors import TrainingError
  quiet = dict(progress=False, log=lambda *a: None)
  # Adam at 1e30 moves D's weights by ~1e30 in step 1, so G's loss against the
  # updated D overflows in the same step: step 1 is bad, and neither network changes.
  bad = dict(learning_rate=1e30, classifier_workdir=classifier_workdir)
  with pytest.raises(TrainingError, match=r"non-finite (loss|gradients.*) at step 1 \(epoch 1\).*"
                                          "no checkpoint had been saved yet"):
    gan.fit(config(tmp_path, **bad), tiny_shapes, **quiet)
  assert not os.path.exists(tmp_path / "gan")  # a failed start leaves nothing behind
  results = gan.fit(config(tmp_path / "skip", nan_policy="skip", epochs=2, **bad), tiny_shapes, **quiet)
  rows = [json.loads(l) for l in (tmp_path / "skip" / "gan" / "metrics.jsonl").read_text().splitlines()]
  assert [r["train_skipped_steps"] for r in rows] == [3.0, 3.0]  # 96 images, batch 32: 3 steps per epoch
  # Nothing was applied: the generator is still the untrained one.
  assert results["frechet_distance_by_epoch"][-1] == results["frechet_distance_initial"]
