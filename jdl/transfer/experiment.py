"""experiments.transfer: pretrain (or load), run the scenarios and their baselines, write a table."""
import dataclasses
import os
import time
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdl import engine, train
from jdl.config import TrainConfig, option, validate as validate_train_config
from jdl.data import Dataset, load_dataset, pipeline, split_validation
from jdl.errors import ConfigError
from jdl.logs import read_jsonl, write_json
from jdl.transfer.features import FeatureCache, bottleneck_features, fingerprint
from jdl.transfer.model import FROZEN_BACKBONE, Head, TransferModel, cut_model, default_cut, init_variables
from jdl.transfer.tasks import FAMILIES, _pick
from jdl.transfer.weights import (Pretrained, _recorded_stats, _saved_config, load_safetensors_resnet,
                                  load_workdir, restore_matching)

SCENARIOS = ("small_similar", "small_different", "large_similar", "large_different")


@dataclasses.dataclass
class TransferConfig(TrainConfig):
  """TrainConfig's training flags, plus the transfer set-up."""
  scenario: str = option("all", "small_similar, small_different, large_similar, large_different, or all")
  pretrained_workdir: Optional[str] = option(None, "an experiments.cifar workdir whose best parameters are the "
                                             "pretrained model (default: pretrain on the source task of "
                                             "--dataset's task family)")
  pretrained_weights: Optional[str] = option(None, "a torchvision-layout ResNet state dict as .safetensors "
                                             "(never pickle) for --model=resnet18/resnet34")
  cut_at: Optional[str] = option(None, "feature to cut the pretrained model at (default: a middle feature for "
                                 "small_different, pre_logits, i.e. drop the last layer, otherwise)")
  head_pool: str = option("flatten", "how the new head turns cut feature maps into a vector: flatten (keeps "
                          "positions; more weights) or avg (global average pooling, the notes' bottleneck head)")
  head_hidden: int = option(0, "width of a hidden Dense + ReLU layer in the new head (0: none; the Keras "
                            "bottleneck example uses 256); --dropout sets the head's dropout rate")
  normalize_inputs: str = option("target", "statistics that normalise the transferred model's inputs: "
                                 "target (the new training split's own) or pretrained (the ones the "
                                 "pretrained model was trained with, e.g. ImageNet mean/std for "
                                 "--pretrained_weights)")
  bottleneck: bool = option(False, "frozen-backbone scenarios: compute the backbone's features once, cache them "
                            "in WORKDIR, train only the head on them")
  fine_tune_from_pretrained: bool = option(False, "large_different: fine-tune from the pretrained weights "
                                           "instead of training from scratch")
  pretrain_epochs: int = option(30, "epochs of the pretraining run on the source task")
  pretrain_augment: bool = option(True, "augment (translate, flip) the pretraining run's images")
  # Set sizes; unset: the task family's (shapes: 1000, 50, 500, 200; fashion_mnist: all 6,000, 50,
  # all 6,000, all 1,000). Without a family only small_per_class and large_per_class apply.
  source_per_class: Optional[int] = option(None, "source task: training images per class (5 classes) "
                                           "(default: shapes 1000, fashion_mnist all 6000)")
  small_per_class: Optional[int] = option(None, "training images per class of the small target sets "
                                          "(default: 50)")
  large_per_class: Optional[int] = option(None, "training images per class of the large target sets "
                                          "(default: shapes 500, fashion_mnist all 6000)")
  test_per_class: Optional[int] = option(None, "test images per class of every task of the family "
                                         "(default: shapes 200, fashion_mnist all 1000)")


# Flag defaults of experiments.transfer that differ from TrainConfig's.
FLAG_DEFAULTS = {"dataset": "shapes", "batch_size": 32, "epochs": 15}
SIZES = ("source_per_class", "small_per_class", "large_per_class", "test_per_class")


def with_sizes(config: TransferConfig) -> TransferConfig:
  """`config` with every unset set size (None) given its task family's default
  (the shapes family's for a --dataset without a family)."""
  family = FAMILIES.lookup(config.dataset if config.dataset in FAMILIES else "shapes")
  return dataclasses.replace(config, **{k: family.sizes[k] for k in SIZES if getattr(config, k) is None})


def validate(config: TransferConfig) -> None:
  """Raises ConfigError (one line) for a bad value or combination, before any compile."""
  validate_train_config(config)
  config = with_sizes(config)

  def check(ok, message):
    if not ok:
      raise ConfigError(message)

  check(config.scenario in SCENARIOS + ("all",),
        f"unknown scenario {config.scenario!r}; choose one of: {', '.join(SCENARIOS + ('all',))}")
  check(config.num_seeds == 1, "--num_seeds applies to experiments.cifar and sequence, not transfer")
  check(config.head_pool in ("avg", "flatten"),
        f"head_pool must be avg or flatten, got {config.head_pool!r}")
  check(config.head_hidden >= 0, f"head_hidden must be >= 0, got {config.head_hidden}")
  check(config.normalize_inputs in ("pretrained", "target"),
        f"normalize_inputs must be pretrained or target, got {config.normalize_inputs!r}")
  check(not (config.pretrained_workdir and config.pretrained_weights),
        "give --pretrained_workdir or --pretrained_weights, not both")
  check(not config.pretrained_workdir
        or os.path.exists(os.path.join(config.pretrained_workdir, "config.json")),
        f"--pretrained_workdir {config.pretrained_workdir} holds no experiments.cifar run (no config.json)")
  if config.pretrained_weights:
    check(config.pretrained_weights.endswith(".safetensors"),
          f"--pretrained_weights {config.pretrained_weights} is not a .safetensors file; jdl never "
          "loads pickle (.pt/.pth): save it with safetensors.torch.save_file(model.state_dict(), path)")
    check(os.path.isfile(config.pretrained_weights),
          f"--pretrained_weights {config.pretrained_weights} does not exist")
    check(config.model in ("resnet18", "resnet34"),
          f"--pretrained_weights holds a torchvision ResNet; use --model=resnet18 or resnet34, not {config.model!r}")
  check(config.dataset in FAMILIES or config.pretrained_workdir or config.pretrained_weights,
        f"--dataset={config.dataset} needs --pretrained_workdir or --pretrained_weights "
        f"(only the task families {', '.join(FAMILIES)} have a source task to pretrain on)")
  check(not (config.bottleneck and config.scenario in ("large_similar", "large_different")),
        f"--bottleneck needs a frozen backbone; scenario {config.scenario} fine-tunes it")
  check(not (config.bottleneck and config.augment),
        "--bottleneck computes features once, so --augment cannot change them; drop one of the two")
  check(not (config.fine_tune_from_pretrained and config.scenario not in ("large_different", "all")),
        "--fine_tune_from_pretrained applies to scenario large_different only")
  for name in ("source_per_class", "test_per_class", "pretrain_epochs"):
    check(getattr(config, name) >= 1, f"{name} must be >= 1, got {getattr(config, name)}")
  check(config.small_per_class >= 2, f"small_per_class must be >= 2, got {config.small_per_class}")
  check(config.large_per_class > config.small_per_class,
        f"large_per_class ({config.large_per_class}) must be larger than small_per_class "
        f"({config.small_per_class})")


def _train_config(config: TransferConfig, **changes) -> TrainConfig:
  base = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)}
  return TrainConfig(**{**base, **changes})


def _subsample(dataset: Dataset, per_class: int, name: str) -> Dataset:
  return dataclasses.replace(dataset, name=name,
                             train=_pick(*dataset.train, range(dataset.num_classes), per_class))


def target_tasks(config: TransferConfig) -> Dict[str, Dataset]:
  """{'source', 'similar_small', ...} datasets: --dataset's task family
  (`jdl.transfer.tasks.FAMILIES`), or without one --dataset subsampled (no source)."""
  config = with_sizes(config)
  if config.dataset in FAMILIES:
    return FAMILIES.lookup(config.dataset).build(
        config.seed, config.source_per_class, config.small_per_class, config.large_per_class,
        config.test_per_class, data_dir=config.data_dir, download=config.download)
  data = load_dataset(config.dataset, data_dir=config.data_dir, num_test=config.num_test or None,
                      download=config.download)
  # One target dataset: whether it is "similar" is the user's call via --scenario.
  small = _subsample(data, config.small_per_class, f"{data.name}-small")
  large = _subsample(data, config.large_per_class, f"{data.name}-large")
  return {"similar_small": small, "different_small": small,
          "similar_large": large, "different_large": large}


def pretrained_model(config: TransferConfig, source: Optional[Dataset], workdir: str,
                     progress: bool, log) -> Pretrained:
  """The pretrained model: --pretrained_workdir, --pretrained_weights or a pretraining run."""
  dtype = jnp.bfloat16 if config.precision == "bfloat16" else jnp.float32
  if config.pretrained_workdir:
    return load_workdir(config.pretrained_workdir, dtype)
  if config.pretrained_weights:
    return load_safetensors_resnet(config.pretrained_weights, config.model,
                                   (32, 32, 3), dtype)
  pre_config = _train_config(config, dataset=source.name, epochs=config.pretrain_epochs,
                             workdir=os.path.join(workdir, "pretrain"),
                             augment=config.pretrain_augment)
  log(f"Pretraining {config.model} on the {config.dataset} source task ({len(source.train[1])} images, "
      f"classes {', '.join(source.class_names)}) in {pre_config.workdir}")
  state, results = train.fit(pre_config, source, progress=progress, log=lambda line: None)
  log(f"  pretrained: test accuracy {results['test_accuracy']:.2%} on the source task")
  variables = {"params": state.params}
  if state.batch_stats is not None:
    variables["batch_stats"] = state.batch_stats
  _, _, saved = _saved_config(pre_config.workdir)
  return Pretrained(train.build_classifier(pre_config, source.num_classes),
                    jax.device_get(variables), pre_config.workdir, results["test_accuracy"],
                    _recorded_stats(saved), tuple(source.input_shape))


def _epoch_times(workdir: str) -> List[float]:
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return [r["epoch_time_s"] for r in rows if "epoch_time_s" in r]


def run_scenario(config: TransferConfig, scenario: str, data: Dataset, pretrained: Pretrained,
                 workdir: str, progress: bool = True, log=print) -> dict:
  """One scenario on `data`; returns its row of the results table."""
  similar = scenario.endswith("similar")
  frozen_backbone = scenario.startswith("small")
  from_scratch = scenario == "large_different" and not config.fine_tune_from_pretrained
  run_config = _train_config(config, dataset=data.name, workdir=os.path.join(workdir, scenario))
  row = {"scenario": scenario, "data": data.name, "num_train": len(data.train[1])}
  if from_scratch:
    log(f"[{scenario}] new head, trained from scratch on {data.name}")
    _, results = train.fit(run_config, data, progress=progress, log=lambda line: None)
    row.update(cut_at=None, trainable_params=results["trainable_params"])
    return _finish_row(row, results)

  input_shape = data.input_shape
  if pretrained.input_shape is not None and tuple(pretrained.input_shape) != tuple(input_shape):
    raise ConfigError(f"{pretrained.source} was trained on inputs of shape {tuple(pretrained.input_shape)}, "
                      f"but {data.name} has {tuple(input_shape)}; transfer needs inputs of the same shape")
  backbone = pretrained.model
  # Only small_different keeps just the early layers; the others drop the last one.
  cut = config.cut_at or default_cut(backbone, input_shape, similar or not frozen_backbone)
  model = TransferModel(cut_model(backbone, cut, input_shape), data.num_classes,
                        train_backbone=not frozen_backbone, head_pool=config.head_pool,
                        head_dropout=config.dropout or 0.0, head_hidden=config.head_hidden,
                        dtype=backbone.dtype)
  variables = restore_matching(init_variables(model, input_shape, config.seed), pretrained.variables,
                               where=f"pretrained weights from {pretrained.source}")
  frozen = FROZEN_BACKBONE if frozen_backbone else ()
  what = ("frozen backbone cut at" if frozen_backbone else "fine-tuning everything, cut at")
  log(f"[{scenario}] {what} {cut!r} + new head ({data.num_classes} classes) on {data.name}")
  row["cut_at"] = cut
  input_stats = None  # train.fit's default: the new training split's own statistics
  if config.normalize_inputs == "pretrained":
    if pretrained.input_stats is None:
      log(f"  {pretrained.source} does not record its input statistics; normalising with the "
          "new training split's")
    input_stats = pretrained.input_stats
  row["normalize_inputs"] = "target" if input_stats is None else "pretrained"
  # What this scenario's run is, beyond its TrainConfig: a rerun must match it to resume.
  scenario_record = {"scenario": scenario, "cut_at": cut, "head_pool": config.head_pool,
                     "head_hidden": config.head_hidden, "normalize_inputs": row["normalize_inputs"],
                     "pretrained": pretrained.path}
  if frozen_backbone and config.bottleneck:
    return _bottleneck(run_config, row, model, variables, data, input_stats, scenario_record,
                       progress, log)
  _, results = train.fit(run_config, data, model=model, variables=variables, frozen=frozen,
                         input_stats=input_stats, extra_record=scenario_record, progress=progress,
                         log=lambda line: None)
  row["trainable_params"] = results["trainable_params"]
  return _finish_row(row, results)


def _bottleneck(run_config: TrainConfig, row: dict, model: TransferModel, variables: dict,
                data: Dataset, input_stats, scenario_record: dict, progress: bool, log) -> dict:
  """Scenarios 1-2 with cached features: the backbone runs once, the head trains.

  `input_stats` normalise the images as train.fit would (None: the training split's).
  """
  os.makedirs(run_config.workdir, exist_ok=True)
  if input_stats is None:
    train_split, _ = split_validation(data.train, run_config.validation_fraction, run_config.seed)
    input_stats = pipeline.channel_stats(train_split[0])  # as train.fit normalises images
  mean, std = input_stats
  cache = FeatureCache(os.path.join(run_config.workdir, "features.npz"))
  backbone_vars = {k: v["backbone"] for k, v in variables.items() if "backbone" in v}
  key = fingerprint(backbone_vars, mean, std, data.train, data.test,
                    np.frombuffer(model.backbone.cut_at.encode(), np.uint8))
  cached = cache.load(key)
  forward_s = None
  if cached is None:
    bottleneck_features(model, variables, data.train[0][:1], mean, std)  # compile outside the timing
    start = time.time()
    train_features = bottleneck_features(model, variables, data.train[0], mean, std)
    forward_s = time.time() - start
    test_features = bottleneck_features(model, variables, data.test[0], mean, std)
    cached = {"train": train_features, "test": test_features,
              "forward_s": np.array(forward_s)}
    cache.save(key, cached)
    log(f"  bottleneck features {train_features.shape[1:]} cached in {cache.path}")
  else:
    log(f"  bottleneck features read from {cache.path}")
  forward_s = float(cached["forward_s"])
  features = Dataset(f"{data.name}-features-{model.backbone.cut_at}",
                     (cached["train"], data.train[1]), (cached["test"], data.test[1]),
                     data.num_classes, data.class_names)
  head = Head(data.num_classes, pool=model.head_pool, dropout=model.head_dropout,
              hidden=model.head_hidden, dtype=model.dtype)
  feature_dim = features.input_shape[-1]
  _, results = train.fit(run_config, features, model=head,
                         input_stats=(np.zeros(feature_dim, np.float32), np.ones(feature_dim, np.float32)),
                         extra_record={**scenario_record, "bottleneck": True},
                         progress=progress, log=lambda line: None)
  epoch_times = _epoch_times(run_config.workdir)[1:]  # the first epoch includes compiling
  head_epoch_s = float(np.median(epoch_times)) if epoch_times else None
  row.update(trainable_params=results["trainable_params"], bottleneck=True,
             features_shape=list(features.input_shape), forward_pass_s=forward_s,
             head_epoch_s=head_epoch_s,
             bottleneck_speedup=(forward_s / head_epoch_s) if head_epoch_s else None)
  if head_epoch_s:
    log(f"  one forward pass over the training set {forward_s:.3f} s vs a head epoch on cached "
        f"features {head_epoch_s:.4f} s: {forward_s / head_epoch_s:.1f}x faster per epoch")
  return _finish_row(row, results)


def _finish_row(row: dict, results: dict) -> dict:
  # best_epoch: the epoch tested, chosen by validation (None without a validation split: the last).
  row.update(epochs=results["epochs_run"], best_epoch=results.get("best_epoch"),
             time_s=results["train_time_s"], test_accuracy=results["test_accuracy"])
  return row


def scratch_baseline(config: TransferConfig, data: Dataset, workdir: str,
                     progress: bool = True) -> dict:
  """The same architecture trained from scratch on the same data."""
  run_config = _train_config(config, dataset=data.name,
                             workdir=os.path.join(workdir, f"scratch-{data.name}"))
  _, results = train.fit(run_config, data, progress=progress, log=lambda line: None)
  return {"epochs": results["epochs_run"], "time_s": results["train_time_s"],
          "test_accuracy": results["test_accuracy"],
          "trainable_params": results["trainable_params"]}


def format_table(rows: Sequence[dict]) -> str:
  """The console table of `run`'s results."""
  header = ("scenario", "train", "cut_at", "trainable", "epochs", "time s", "test acc",
            "scratch acc", "scratch s")
  lines = [[r["scenario"], str(r["num_train"]), str(r.get("cut_at") or "-"),
            f"{r['trainable_params']:,}", str(r["epochs"]), f"{r['time_s']:.1f}",
            f"{r['test_accuracy']:.2%}", f"{r['scratch']['test_accuracy']:.2%}",
            f"{r['scratch']['time_s']:.1f}"] for r in rows]
  widths = [max(len(c) for c in col) + 2 for col in zip(header, *lines)]
  fmt = lambda cells: "".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  return "\n".join([fmt(header)] + [fmt(cells) for cells in lines])


def run(config: TransferConfig, *, progress: bool = True, log=print) -> dict:
  """experiments.transfer: pretrain or load, then each scenario and its baseline.

  Everything lands in WORKDIR: pretrain/, one directory per scenario and per
  baseline (each resumable like any experiments.cifar run), results.json with
  the table.
  """
  start = time.time()
  validate(config)
  config = with_sizes(config)  # recorded as numbers
  workdir = config.workdir or engine.default_workdir("transfer", config.dataset, config.model,
                                                     seed=config.seed)
  record = {"task": "transfer", **dataclasses.asdict(config)}
  with engine.workdir(workdir, record, may_change=("scenario",)) as record:
    return _run(config, workdir, record, start, progress, log)


def _run(config: TransferConfig, workdir: str, record: dict, start: float, progress: bool, log) -> dict:
  tasks = target_tasks(config)
  source = tasks.pop("source", None)
  pretrained = pretrained_model(config, source, workdir, progress, log)
  scenarios = SCENARIOS if config.scenario == "all" else (config.scenario,)
  rows, baselines = [], {}
  for scenario in scenarios:
    size, kind = scenario.split("_")
    data = tasks[f"{kind}_{size}"]
    row = run_scenario(config, scenario, data, pretrained, workdir, progress, log)
    if data.name not in baselines:
      if scenario == "large_different" and row.get("cut_at") is None:
        baselines[data.name] = {k: row[k] for k in ("epochs", "time_s", "test_accuracy",
                                                     "trainable_params")}  # it is the baseline
      else:
        baselines[data.name] = scratch_baseline(config, data, workdir, progress)
    row["scratch"] = baselines[data.name]
    log(f"  test accuracy {row['test_accuracy']:.2%} (from scratch {row['scratch']['test_accuracy']:.2%}), "
        f"{row['trainable_params']:,} trainable parameters, {row['time_s']:.1f} s")
    rows.append(row)
  table = format_table(rows)
  log("\n" + table)
  results = {"config": record, "pretrained": {
      "source": pretrained.source, "test_accuracy": pretrained.test_accuracy},
      "scenarios": rows, "wall_time_s": time.time() - start}
  write_json(os.path.join(workdir, "results.json"), results)
  log(f"results in {workdir}/results.json")
  return results
