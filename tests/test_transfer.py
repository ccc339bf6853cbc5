"""Transfer learning: freezing, cutting, partial restore, bottleneck cache, scenarios."""
import dataclasses
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdl import checkpoint, optim, train, transfer
from jdl.data import pipeline, split_validation
from jdl.config import TrainConfig
from jdl.errors import CheckpointError, ConfigError
from jdl.models import ResNet, build_model
from jdl.summary import count_params, summarize

# A ResNet small enough to compile in a second: 2 stages of 1 block, BatchNorm.
TINY_RESNET = dict(stage_sizes=(1, 1), widths=(4, 8), num_classes=3)
SHAPE = (8, 8, 3)


def _batch(seed=0, n=4):
  key = jax.random.key(seed)
  return (jax.random.normal(key, (n, *SHAPE)),
          jax.random.randint(jax.random.fold_in(key, 1), (n,), 0, 3))


def test_frozen_parameters_and_their_batchnorm_statistics_stay_bit_identical():
  model = ResNet(**TINY_RESNET)
  patterns = ("^layer1_0/", "^conv1/")
  # adamw with weight decay: decay too must skip frozen parameters.
  tx = optim.make_optimizer("adamw", 0.05, weight_decay=0.5)
  state = train.create_train_state(model, SHAPE, tx, jax.random.key(0), frozen=patterns)
  frozen_stats = optim.frozen_mask(state.batch_stats, patterns)
  step = jax.jit(lambda s, b, r: train.train_step(s, b, r, frozen_stats=frozen_stats))
  new = state
  for i in range(3):
    new, metrics = step(new, _batch(i), jax.random.key(i))
  assert np.isfinite(float(metrics["loss"]))
  for tree, new_tree in ((state.params, new.params), (state.batch_stats, new.batch_stats)):
    flat = {optim.path_of(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    new_flat = {optim.path_of(k): v for k, v in jax.tree_util.tree_leaves_with_path(new_tree)}
    for path, value in flat.items():
      if path.startswith(("layer1_0/", "conv1/")):
        assert np.array_equal(np.asarray(value), np.asarray(new_flat[path])), f"frozen {path} changed"
  # Trainable parts did change (the test can fail both ways).
  assert not np.array_equal(state.params["layer2_0"]["conv1"]["kernel"],
                            new.params["layer2_0"]["conv1"]["kernel"])
  assert not np.array_equal(state.batch_stats["layer2_0"]["bn1"]["mean"],
                            new.batch_stats["layer2_0"]["bn1"]["mean"])
  with pytest.raises(ConfigError, match="matches no parameter"):
    optim.freeze(optax.sgd(0.1), state.params, ("^nothing_here/",))


def test_head_replacement_and_cut_shapes():
  backbone = ResNet(stage_sizes=(1, 1, 1), widths=(4, 8, 16), num_classes=3)
  model = transfer.TransferModel(transfer.cut_model(backbone, "layer2", SHAPE),
                                 num_classes=5, train_backbone=False)
  variables = transfer.init_variables(model, SHAPE)
  assert set(variables["params"]) == {"backbone", "head"}
  # Only the stem and stages 1-2 exist: the cut removed stage 3 and the old head.
  assert set(variables["params"]["backbone"]) == {"conv1", "bn1", "layer1_0", "layer2_0"}
  assert variables["params"]["head"]["fc"]["kernel"].shape == (8, 5)  # GAP of (4, 4, 8)
  logits, features = model.apply(variables, jnp.zeros((2, *SHAPE)))
  assert logits.shape == (2, 5) and features["backbone"].shape == (2, 4, 4, 8)
  # Drop only the last layer: cut at pre_logits keeps everything but 'fc'.
  abstract = lambda m: jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, *SHAPE)))
  head_only = transfer.TransferModel(backbone.clone(cut_at="pre_logits"), num_classes=7)
  v = abstract(head_only)
  assert count_params(v["params"]["backbone"]) == count_params(abstract(backbone)["params"]) - 16 * 3 - 3
  assert v["params"]["head"]["fc"]["kernel"].shape == (16, 7)
  # The Keras-style head: a hidden Dense + ReLU between the features and 'fc'.
  hidden = abstract(transfer.TransferModel(backbone.clone(cut_at="pre_logits"), num_classes=7,
                                           head_hidden=32))["params"]["head"]
  assert hidden["hidden"]["kernel"].shape == (16, 32) and hidden["fc"]["kernel"].shape == (32, 7)
  # A flatten head keeps where each pattern is: H * W * C inputs.
  flat = abstract(transfer.TransferModel(transfer.cut_model(backbone, "layer2", SHAPE), num_classes=5,
                                         head_pool="flatten"))["params"]["head"]
  assert flat["fc"]["kernel"].shape == (4 * 4 * 8, 5)
  with pytest.raises(ConfigError, match="'layer9' is not a layer of ResNet; choose one of: "
                                        "stem, layer1, layer2, layer3, pre_logits"):
    transfer.cut_model(backbone, "layer9", SHAPE)
  assert transfer.default_cut(backbone, SHAPE, similar=False) == "layer1"
  assert transfer.default_cut(build_model("resnet18"), (32, 32, 3), similar=False) == "layer2"
  # The cnn's hidden Dense layer goes (the cut is its last feature map); models
  # without one are cut in the middle.
  assert transfer.default_cut(build_model("cnn"), (32, 32, 3), similar=False) == "block3"
  assert transfer.default_cut(build_model("lenet5"), (32, 32, 3), similar=False) == "block2"
  assert transfer.default_cut(backbone, SHAPE, similar=True) == "pre_logits"


def test_summary_marks_frozen_layers():
  model = transfer.TransferModel(ResNet(**TINY_RESNET, cut_at="layer1"), 2, train_backbone=False)
  summary = summarize(model, SHAPE, frozen=optim.path_matcher(transfer.FROZEN_BACKBONE))
  rows = {row.name: row for row in summary.rows}
  assert rows["backbone/conv1"].trainable == 0 and rows["backbone/conv1"].frozen == 3 * 3 * 3 * 4
  assert rows["head/fc"].trainable == 4 * 2 + 2
  assert summary.trainable_params == 10
  text = str(summary)
  assert "Trainable" in text
  assert [line.split()[-1] for line in text.splitlines() if "backbone/conv1 " in line] == ["N"]
  assert [line.split()[-1] for line in text.splitlines() if "head/fc " in line] == ["Y"]


def test_partial_restore_copies_matching_arrays_and_names_mismatches():
  source_model = ResNet(**TINY_RESNET)
  source = transfer.init_variables(source_model, SHAPE, seed=1)
  model = transfer.TransferModel(source_model.clone(cut_at="pre_logits"), num_classes=6)
  target = transfer.init_variables(model, SHAPE, seed=2)
  restored = transfer.restore_matching(target, source)
  np.testing.assert_array_equal(restored["params"]["backbone"]["layer2_0"]["conv2"]["kernel"],
                                source["params"]["layer2_0"]["conv2"]["kernel"])
  np.testing.assert_array_equal(restored["batch_stats"]["backbone"]["bn1"]["var"],
                                source["batch_stats"]["bn1"]["var"])
  np.testing.assert_array_equal(restored["params"]["head"]["fc"]["kernel"],  # the new head stays
                                target["params"]["head"]["fc"]["kernel"])
  # Other widths: the error names the path and both shapes.
  other = transfer.init_variables(ResNet(stage_sizes=(1, 1), widths=(4, 16), num_classes=3), SHAPE)
  with pytest.raises(CheckpointError, match=r"params/layer2_0/conv1/kernel is \(3, 3, 4, 16\) there "
                                            r"but params/backbone/layer2_0/conv1/kernel is \(3, 3, 4, 8\)"):
    transfer.restore_matching(target, other)
  # A missing layer is named too.
  shallow = transfer.init_variables(ResNet(stage_sizes=(1,), widths=(4,), num_classes=3), SHAPE)
  with pytest.raises(CheckpointError, match=r"have no params/layer2_0/"):
    transfer.restore_matching(target, shallow)


class _Payload:
  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_feature_cache_round_trip_staleness_and_pickle_refusal(tmp_path):
  cache = transfer.FeatureCache(str(tmp_path / "features.npz"))
  assert cache.load("abc") is None
  arrays = {"train": np.random.default_rng(0).normal(size=(5, 2, 2, 3)).astype(np.float32),
            "test": np.arange(6, dtype=np.float32).reshape(2, 3)}
  cache.save("abc", arrays)
  loaded = cache.load("abc")
  assert set(loaded) == {"train", "test"}
  for name in arrays:
    np.testing.assert_array_equal(loaded[name], arrays[name])
  assert cache.load("other weights") is None  # stale: recomputed by the caller
  # Fingerprints see every byte.
  assert transfer.fingerprint(arrays) != transfer.fingerprint({**arrays, "test": arrays["test"] + 1})
  # A pickle where the cache should be is refused and never runs.
  marker = tmp_path / "pwned"
  (tmp_path / "features.npz").write_bytes(pickle.dumps(_Payload(marker)))
  with pytest.raises(CheckpointError, match=r"features.npz is damaged or not a NumPy archive.*never loads pickle"):
    cache.load("abc")
  # An .npz holding an object array (pickled inside) is refused as well.
  np.savez(tmp_path / "features.npz", fingerprint=np.array("abc"),
           train=np.array([_Payload(marker)], dtype=object))
  with pytest.raises(CheckpointError, match="never loads pickle"):
    cache.load("abc")
  assert not marker.exists()


def test_fashion_mnist_family_splits_the_classes_and_its_different_target_is_grey_shapes():
  tasks = transfer.fashion_mnist_tasks(seed=0, source_per_class=8, small_per_class=3, large_per_class=6,
                                       test_per_class=4)
  assert tasks["source"].class_names == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat")
  assert tasks["similar_small"].class_names == ("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
  assert tasks["different_small"].class_names == ("cross", "star", "crescent", "heart", "bar")
  for name, per_class in (("source", 8), ("similar_small", 3), ("similar_large", 6),
                          ("different_small", 3), ("different_large", 6)):
    data = tasks[name]
    assert data.input_shape == (28, 28, 1) and data.train[0].dtype == np.uint8, name
    assert np.bincount(data.train[1], minlength=5).tolist() == [per_class] * 5, name
    assert np.bincount(data.test[1], minlength=5).tolist() == [4] * 5, name
  # The classes are Fashion-MNIST's, split in two: no source image is a target image.
  from jdl.data import load_dataset
  fashion = load_dataset("fashion_mnist")
  index = {image.tobytes(): label for image, label in zip(*fashion.train)}
  index.update({image.tobytes(): label for image, label in zip(*fashion.test)})
  for name, classes in (("source", (0, 1, 2, 3, 4)), ("similar_large", (5, 6, 7, 8, 9))):
    for images, labels in (tasks[name].train, tasks[name].test):
      np.testing.assert_array_equal([index[image.tobytes()] for image in images], np.array(classes)[labels])
  # The small set is the start of the large one, for both targets.
  for kind in ("similar", "different"):
    small, large = tasks[f"{kind}_small"].train, tasks[f"{kind}_large"].train
    for c in range(5):
      np.testing.assert_array_equal(small[0][small[1] == c], large[0][large[1] == c][:3])
  # The different target is not clothing: none of its images is in Fashion-MNIST.
  assert not any(image.tobytes() in index for image in tasks["different_large"].train[0])
  # Unset sizes are the family's: all of Fashion-MNIST but 50 per class for the small sets.
  sized = transfer.with_sizes(transfer.TransferConfig(dataset="fashion_mnist"))
  assert (sized.source_per_class, sized.small_per_class, sized.large_per_class, sized.test_per_class) == (
      6000, 50, 6000, 1000)
  assert transfer.with_sizes(transfer.TransferConfig(dataset="shapes", large_per_class=300)).large_per_class == 300


def test_shapes_tasks_are_disjoint_classes_and_styles():
  tasks = transfer.shapes_tasks(seed=0, source_per_class=4, small_per_class=2, large_per_class=5,
                                test_per_class=3)
  assert tasks["source"].class_names == ("disk", "ring", "square", "frame", "triangle")
  assert tasks["similar_small"].class_names == ("cross", "star", "crescent", "heart", "bar")
  for name, per_class in (("source", 4), ("similar_small", 2), ("different_large", 5)):
    labels = tasks[name].train[1]
    assert np.bincount(labels, minlength=5).tolist() == [per_class] * 5, name
  sketch = tasks["different_small"].train[0]
  assert np.array_equal(sketch[..., 0], sketch[..., 2])  # grey line drawings
  assert sketch.mean() > 200  # mostly white paper
  # The small set is the start of the large one, and similar/different are the same images.
  np.testing.assert_array_equal(tasks["similar_small"].train[1], tasks["different_small"].train[1])
  np.testing.assert_array_equal(transfer.sketch(tasks["similar_small"].train[0]), sketch)


@pytest.mark.parametrize("changes, message", [
    (dict(scenario="medium_similar"), "unknown scenario 'medium_similar'; choose one of"),
    (dict(bottleneck=True, scenario="large_similar"), "--bottleneck needs a frozen backbone"),
    (dict(bottleneck=True, augment=True, scenario="small_similar"), "--augment cannot change them"),
    (dict(pretrained_workdir="a", pretrained_weights="b.safetensors"), "not both"),
    (dict(pretrained_workdir="/nonexistent/run"), "holds no experiments.cifar run"),
    (dict(pretrained_weights="model.pt", model="resnet18"), "never loads pickle"),
    (dict(fine_tune_from_pretrained=True, scenario="small_similar"), "large_different only"),
    (dict(dataset="cifar10"), "needs --pretrained_workdir or --pretrained_weights (only the task "
                              "families fashion_mnist, shapes have a source task"),
    (dict(large_per_class=10, small_per_class=10), "must be larger than small_per_class"),
    (dict(learning_rate=0.0), "learning_rate must be > 0"),
    (dict(head_hidden=-1), "head_hidden must be >= 0, got -1"),
    (dict(normalize_inputs="imagenet"), "normalize_inputs must be pretrained or target"),
])
def test_bad_transfer_config_is_one_line(changes, message):
  config = transfer.TransferConfig(**{**transfer.FLAG_DEFAULTS, **changes})
  with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as info:
    transfer.validate(config)
  assert "\n" not in str(info.value)


# One short --scenario=all run (lenet5: the cheapest conv net to compile), shared.
SMALL = dict(model="lenet5", source_per_class=24, small_per_class=6, large_per_class=12,
             test_per_class=6, epochs=2, pretrain_epochs=2, batch_size=8, log_every=1000,
             validation_fraction=0.2)


@pytest.fixture(scope="module")
def scenario_all(tmp_path_factory):
  """On the real Fashion-MNIST family (28x28x1), with the notes' bottleneck recipe:
  cached features and a GlobalAveragePooling + Dense head."""
  workdir = str(tmp_path_factory.mktemp("transfer") / "run")
  # Inputs normalised with the pretraining run's statistics (not the default):
  # that path reaches both train.fit and the bottleneck features.
  config = transfer.TransferConfig(**{**transfer.FLAG_DEFAULTS, **SMALL, "workdir": workdir,
                                      "dataset": "fashion_mnist", "bottleneck": True, "head_pool": "avg",
                                      "normalize_inputs": "pretrained"})
  lines = []
  results = transfer.run(config, progress=False, log=lines.append)
  return config, workdir, results, "\n".join(lines)


def test_scenario_all_writes_the_table(scenario_all):
  config, workdir, results, log = scenario_all
  rows = {row["scenario"]: row for row in results["scenarios"]}
  assert list(rows) == list(transfer.SCENARIOS)
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["scenarios"][0]["scenario"] == "small_similar"
  for row in rows.values():
    assert 0.0 <= row["test_accuracy"] <= 1.0 and row["epochs"] == 2
    assert 0.0 <= row["scratch"]["test_accuracy"] <= 1.0
  assert rows["small_similar"]["data"] == "fashion_mnist-similar-small"
  assert rows["small_different"]["data"] == "shapes_grey28-different-small"
  assert results["pretrained"]["source"].endswith("pretrain")
  # small_similar trains only the new head on lenet5's 84 pre-logits: 84 * 5 + 5.
  assert rows["small_similar"]["trainable_params"] == 84 * 5 + 5
  assert rows["small_different"]["cut_at"] == "block2"  # lenet5 without its Dense 120, 84
  assert rows["small_different"]["features_shape"] == [4, 4, 16]  # at 28x28
  assert rows["small_different"]["trainable_params"] == 16 * 5 + 5  # GlobalAveragePooling, Dense
  for name in ("small_similar", "small_different", "large_similar"):
    assert rows[name]["normalize_inputs"] == "pretrained"
  with open(os.path.join(workdir, "pretrain", "config.json")) as f:
    pretrain = json.load(f)
  assert pretrain["augment"] and pretrain["dataset"] == "fashion_mnist-source"  # --pretrain_augment's default
  assert rows["small_similar"]["bottleneck"] and rows["small_similar"]["bottleneck_speedup"] > 1
  assert os.path.exists(os.path.join(workdir, "small_similar", "features.npz"))
  # Fine-tuning trains everything but the cut-off old head; from scratch is the baseline.
  assert rows["large_similar"]["trainable_params"] == rows["large_similar"]["scratch"]["trainable_params"]
  assert rows["large_different"]["cut_at"] is None
  assert rows["large_different"]["test_accuracy"] == rows["large_different"]["scratch"]["test_accuracy"]
  assert "scenario" in log and "scratch acc" in log


def test_rerun_resumes_and_the_pretraining_run_loads_as_a_workdir(scenario_all):
  config, workdir, results, _ = scenario_all
  tasks = transfer.target_tasks(config)
  # The pretraining run is an experiments.cifar workdir: load it as one (no target
  # structure), and compare with Orbax's restore into a freshly built state.
  pretrained = transfer.load_workdir(os.path.join(workdir, "pretrain"))
  assert pretrained.model.num_classes == 5 and type(pretrained.model).__name__ == "LeNet5"
  tx, _ = train.build_optimizer(transfer.experiment._train_config(config), 10, 10)
  target = train.create_train_state(pretrained.model, (28, 28, 1), tx, jax.random.key(0))
  best, _ = checkpoint.Checkpoints(os.path.join(workdir, "pretrain"), best_mode="max").restore_best(target)
  for a, b in zip(jax.tree.leaves(pretrained.variables["params"]), jax.tree.leaves(best.params)):
    np.testing.assert_array_equal(a, b)
  # It records the input statistics it was trained with: its training split's
  # (after holding out validation), which the transferred models reuse.
  source_train, _ = split_validation(tasks["source"].train, config.validation_fraction, config.seed)
  for recorded, expected in zip(pretrained.input_stats, pipeline.channel_stats(source_train[0])):
    np.testing.assert_array_equal(recorded, expected)
  # Rerunning a finished scenario resumes it: features come from the cache and
  # the figures repeat exactly.
  lines = []
  row = transfer.run_scenario(config, "small_similar", tasks["similar_small"], pretrained,
                              workdir, progress=False, log=lines.append)
  assert any("bottleneck features read from" in line for line in lines)
  assert row["test_accuracy"] == results["scenarios"][0]["test_accuracy"]
  # Without a validation split the last epoch is tested (no best epoch).
  no_val = dataclasses.replace(config, validation_fraction=0.0, bottleneck=False, head_pool="flatten")
  row = transfer.run_scenario(no_val, "small_similar", tasks["similar_small"], pretrained,
                              os.path.join(workdir, "no-validation"), progress=False, log=lines.append)
  assert row["best_epoch"] is None and row["epochs"] == 2 and 0.0 <= row["test_accuracy"] <= 1.0


def test_pretrained_run_of_another_input_shape_or_kind_is_named_and_nothing_is_left(tmp_path):
  """A GRU trained on MNIST-1D sequences cannot be transferred to 32x32 images: the
  error says what the workdir holds, and the transfer workdir is not left behind."""
  quiet = dict(progress=False, log=lambda *a: None)
  gru = TrainConfig(dataset="mnist1d", model="gru", hidden_size=8, epochs=1, num_train=200,
                    num_test=50, batch_size=50, workdir=str(tmp_path / "gru"), log_every=1000)
  train.fit(gru, **quiet)
  config = transfer.TransferConfig(**{**transfer.FLAG_DEFAULTS, **SMALL, "scenario": "small_similar",
                                      "pretrained_workdir": gru.workdir,
                                      "workdir": str(tmp_path / "transfer")})
  with pytest.raises(ConfigError, match=r"gru, step 3\) was trained on inputs of shape \(40, 1\), "
                                        r"but shapes-similar-small has \(32, 32, 3\)"):
    transfer.run(config, **quiet)
  assert not os.path.exists(tmp_path / "transfer")
  # A workdir of another task (here a GAN's record) is named as such.
  record = json.loads((tmp_path / "gru" / "config.json").read_text())
  (tmp_path / "gru" / "config.json").write_text(json.dumps({**record, "task": "gan"}))
  with pytest.raises(ConfigError, match=r"holds a gan run, not a classifier run of experiments.cifar"):
    transfer.run(config, **quiet)
  assert not os.path.exists(tmp_path / "transfer")
