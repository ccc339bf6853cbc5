"""The DCGAN experiment's loop: data, both networks, checkpoints, samples and scores."""
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from jdl import parallel, xla
from jdl.config import make_writable_dir
from jdl.data import pipeline
from jdl.errors import ConfigError
from jdl.gan.config import GANConfig, validate_config
from jdl.gan.quality import label_report, sample_quality, train_scorer
from jdl.gan.step import create_gan_state, gan_train_step, generate, make_optimizers
from jdl.images import save_image_grid, to_unit_range
from jdl.reliability import StepChecker, StopSignals, save_mid_epoch
from jdl.train import PRNG_IMPL


def fixed_noise(config: GANConfig, num_classes: int, count: int = 64):
  """The grid's latent vectors (and labels: row-major, class i % num_classes), fixed per seed."""
  z = jax.random.normal(jax.random.key(config.seed + 1, impl=PRNG_IMPL), (count, config.latent_dim))
  labels = jnp.arange(count, dtype=jnp.int32) % max(num_classes, 1)
  return z, labels


def fit(config: GANConfig, dataset=None, *, devices=None, progress: bool = True, log=print) -> dict:
  """Trains a DCGAN as `config` says, resuming from its workdir.

  Each epoch: the step loop, a grid of samples from fixed noise (PNG and
  TensorBoard), and the Fréchet distance in the scoring classifier's feature
  space. Returns the dict also written to WORKDIR/results.json. With more
  than one device (`devices`, default all) each step is data parallel, as in
  jdl.train.fit: BatchNorm statistics and gradients are those of the whole
  batch.
  """
  from tqdm import tqdm
  from jdl import checkpoint
  from jdl.data import load_dataset
  from jdl.logs import MetricWriter, write_json
  from jdl.models.decoder import Discriminator, Generator
  from jdl.plots import plot_panels
  from jdl.summary import summarize

  start_time = time.time()
  validate_config(config)
  mesh = parallel.data_mesh(devices)
  parallel.check_batch_size(config.batch_size, mesh)
  if dataset is None:
    dataset = load_dataset(config.dataset, data_dir=config.data_dir, num_train=config.num_train or None,
                           seed=config.seed, download=config.download)
  if len(dataset.input_shape) != 3:
    raise ConfigError(f"a GAN needs images (H, W, C); {dataset.name} has inputs of shape {dataset.input_shape}")
  images, labels = dataset.train
  if config.batch_size > len(labels):
    raise ConfigError(f"batch_size {config.batch_size} is larger than the training set ({len(labels)} images)")
  num_classes = dataset.num_classes if config.conditional else 0
  generator = Generator(tuple(dataset.input_shape), config.g_width, num_classes=num_classes,
                        conditioning=config.g_conditioning)
  discriminator = Discriminator(config.d_width, num_classes=num_classes,
                                conditioning=config.d_conditioning,
                                class_head=bool(num_classes and config.class_loss_weight > 0))
  workdir = config.workdir or f"runs/gan-{config.dataset.replace('/', '_')}-seed{config.seed}"
  make_writable_dir(os.path.join(workdir, "samples"))
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      previous = json.load(f)
    previous.setdefault("g_conditioning", "concat")  # the only kind before it was a flag
    keys = ("dataset", "conditional", "g_width", "d_width", "latent_dim")
    if config.conditional:
      keys += ("d_conditioning", "g_conditioning")
    for key in keys:
      if previous.get(key) != getattr(config, key):
        raise ConfigError(f"workdir {workdir} holds a GAN run with {key}={previous.get(key)!r}, "
                          f"not {getattr(config, key)!r}; use another --workdir")
    if config.conditional and (previous.get("class_loss_weight", 0.0) > 0) != discriminator.class_head:
      # Any positive weight is the same network; 0 has no class head to restore.
      raise ConfigError(f"workdir {workdir} holds a GAN run with class_loss_weight="
                        f"{previous.get('class_loss_weight', 0.0)!r}, not {config.class_loss_weight!r} "
                        "(a class head in D only with a positive weight); use another --workdir")
  write_json(config_path, dataclasses.asdict(config))

  label_args = (jnp.zeros((1,), jnp.int32),) if num_classes else ()
  for name, module, shape in (("Generator", generator, (config.latent_dim,)),
                              ("Discriminator", discriminator, tuple(dataset.input_shape))):
    summary = summarize(module, shape, call_kwargs=({"labels": label_args[0]} if num_classes else None))
    log(f"{name} on {dataset.name} {dataset.input_shape}\n{summary}")

  scorer, classifier_accuracy = train_scorer(config, dataset, workdir, log, devices)
  eval_images = dataset.test[0][:config.num_eval]
  real_features, _ = scorer(eval_images)

  init_key, data_key, step_key, eval_key = jax.random.split(jax.random.key(config.seed, impl=PRNG_IMPL), 4)
  g_tx, d_tx = make_optimizers(config.learning_rate, config.beta1)
  state = create_gan_state(generator, discriminator, dataset.input_shape, config.latent_dim,
                           init_key, g_tx=g_tx, d_tx=d_tx)
  state = parallel.replicate(state, mesh)  # before restoring, which keeps these shardings
  parallel.announce(mesh, config.batch_size, log)
  _, batch_sharding = parallel.shardings(mesh)
  steps_per_epoch = len(labels) // config.batch_size
  ckpts = checkpoint.Checkpoints(workdir, config.keep_checkpoints)
  meta = {"epoch": 0, "step_in_epoch": 0, "partial_sums": None, "train_time_s": 0.0,
          "initial_quality": None}
  restored = ckpts.restore_latest(state)
  if restored is not None:
    state, saved = restored
    meta.update(saved)
    log(f"Resuming from {workdir}: epoch {meta['epoch']} done, step {int(state.step)}")
  if meta["initial_quality"] is None:  # the untrained generator, for reference
    meta["initial_quality"] = sample_quality(state, scorer, real_features, eval_key,
                                             len(eval_images), num_classes)
  writer = MetricWriter(workdir, meta["epoch"])
  data = parallel.replicate({"images": images, "labels": labels}, mesh)
  z_grid, labels_grid = fixed_noise(config, num_classes)

  @functools.partial(xla.jit, donate_argnums=(0, 1))
  def train_fn(state, sums, data, order, index, step_key):
    batch_images, batch_labels = pipeline.take_batch(data["images"], data["labels"], order, index,
                                                     config.batch_size)
    batch_images, batch_labels = parallel.shard_batch((batch_images, batch_labels), batch_sharding)
    state, metrics = gan_train_step(state, to_unit_range(batch_images), batch_labels,
                                    jax.random.fold_in(step_key, state.step), config.real_label,
                                    config.class_loss_weight, config.d_augment)
    status = metrics.pop("status")
    bad = status > 0  # a skipped step's metrics stay out of the sums; it is counted
    sums = {k: sums[k] + (bad.astype(jnp.float32) if k == "skipped" else jnp.where(bad, 0.0, metrics[k]))
            for k in sums}
    return state, sums, status

  order_fn = jax.jit(pipeline.epoch_permutation, static_argnums=2)
  names = ("d_loss", "g_loss", "d_real", "d_fake", "d_grad_norm", "g_grad_norm", "skipped")
  if discriminator.class_head:
    names += ("d_class_acc_real", "d_class_acc_fake")
  with StopSignals() as stop:
    for epoch in range(meta["epoch"] + 1, config.epochs + 1):
      epoch_start = time.time()
      first_index = meta["step_in_epoch"]
      order = order_fn(data_key, epoch, len(labels))
      sums = {k: jnp.zeros((), jnp.float32) for k in names}
      if meta["partial_sums"]:
        sums = {k: jnp.asarray(meta["partial_sums"].get(k, 0.0), jnp.float32) for k in names}
      with tqdm(total=steps_per_epoch, initial=first_index, unit="step", desc=f"epoch {epoch}/{config.epochs}",
                disable=not progress, leave=False, file=sys.stderr, mininterval=0.5) as bar:
        checker = StepChecker(config.nan_policy, epoch, workdir, on_done=lambda: bar.update(1),
                              hint="Lower --learning_rate, or pass --nan_policy=skip to skip such steps")
        for index in range(first_index, steps_per_epoch):
          state, sums, status = train_fn(state, sums, data, order, index, step_key)
          checker.push(int(state.step), status)
          if (index + 1) % 20 == 0:
            bar.set_postfix(d_loss=f"{float(sums['d_loss']) / (index + 1 - first_index + 1e-9):.3f}")
          if stop.signum and index + 1 < steps_per_epoch:
            checker.flush()  # a bad step stops here, before its state could be saved
            save_mid_epoch(ckpts, state, meta, index + 1, sums, time.time() - epoch_start)
            raise stop.interrupted(f"at step {int(state.step)} (epoch {epoch})", workdir)
        checker.flush()
      sums = jax.device_get(sums)
      skipped = float(sums.pop("skipped"))
      row = {k: float(v) / max(steps_per_epoch - skipped, 1) for k, v in sums.items()}
      if config.nan_policy == "skip":
        row["skipped_steps"] = skipped
      meta["train_time_s"] += time.time() - epoch_start
      row.update(sample_quality(state, scorer, real_features, eval_key, len(eval_images), num_classes))
      row["epoch_time_s"] = time.time() - epoch_start
      grid = save_image_grid(generate(state, z_grid, labels_grid if num_classes else None),
                             os.path.join(workdir, "samples", f"epoch_{epoch:03d}.png"))
      writer.write(int(state.step), epoch, row)
      writer.add_image("samples", grid, int(state.step))
      meta.update(epoch=epoch, step_in_epoch=0, partial_sums=None)
      ckpts.save_latest(int(state.step), state, meta)
      log(f"epoch {epoch}/{config.epochs}  d_loss {row['d_loss']:.3f}  g_loss {row['g_loss']:.3f}  "
          f"D(x) {row['d_real']:.2f}  D(G(z)) {row['d_fake']:.2f}  Fréchet {row['frechet_distance']:.2f}"
          + (f"  label match {row['label_match_rate']:.1%}" if num_classes else "")
          + f"  {row['epoch_time_s']:.0f}s")
      if stop.signum and epoch < config.epochs:
        raise stop.interrupted(f"after epoch {epoch}", workdir)

  writer.close()
  ckpts.close()
  final_grid = save_image_grid(generate(state, z_grid, labels_grid if num_classes else None),
                               os.path.join(workdir, "samples", "final.png"))
  history = writer.history
  curves = None
  if history:
    panels = {"losses": ["d_loss", "g_loss"], "discriminator outputs": ["d_real", "d_fake"],
              "Fréchet distance (classifier features)": ["frechet_distance"]}
    if num_classes:
      panels["label match rate"] = ["label_match_rate"] + (
          ["d_class_acc_real", "d_class_acc_fake"] if discriminator.class_head else [])
    curves = plot_panels(history, os.path.join(workdir, "learning_curves.png"), panels,
                         title=f"DCGAN on {dataset.name}")
  fd = [r["frechet_distance"] for r in history]
  results = {
      "config": dataclasses.asdict(config),
      "dataset": {"name": dataset.name, "num_train": len(labels), "num_eval": len(eval_images)},
      "frechet_distance_note": ("Fréchet distance between Gaussians fitted to the scoring cnn's "
                                "pre_logits features of real test images and generated samples; "
                                "NOT comparable with Inception-based FID"),
      "scoring_classifier_test_accuracy": classifier_accuracy,
      "frechet_distance_initial": meta["initial_quality"]["frechet_distance"],
      "frechet_distance_by_epoch": fd,
      "frechet_distance_first_epoch": fd[0] if fd else None,
      "frechet_distance_last_epoch": fd[-1] if fd else None,
      "label_match_rate_last_epoch": history[-1].get("label_match_rate") if history else None,
      "label_match_chance": (1.0 / num_classes) if num_classes else None,
      "label_report": (label_report(state, scorer, jax.random.fold_in(eval_key, 1))
                       if num_classes and history else None),
      "final_losses": {k: history[-1][k] for k in ("d_loss", "g_loss", "d_real", "d_fake")} if history else None,
      "epochs_run": meta["epoch"],
      "train_time_s": meta["train_time_s"],
      "wall_time_s": time.time() - start_time,
      "samples": final_grid,
      "learning_curves": curves,
  }
  write_json(os.path.join(workdir, "results.json"), results)
  if fd:
    log(f"Fréchet distance {results['frechet_distance_initial']:.2f} untrained, {fd[0]:.2f} after epoch 1, "
        f"{fd[-1]:.2f} after epoch {meta['epoch']}"
        + (f"; label match {results['label_match_rate_last_epoch']:.1%} (chance {1 / num_classes:.0%})"
           if num_classes else "") + f"; results in {workdir}/results.json")
  return results
