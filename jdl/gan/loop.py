"""The DCGAN task: data, both networks, the scoring classifier, then `jdl.engine.run`."""
import dataclasses
import os
from typing import Optional

import jax
import jax.numpy as jnp

from jdl import engine, ops, parallel
from jdl.core import PRNG_IMPL
from jdl.data import pipeline
from jdl.errors import ConfigError
from jdl.gan.config import SAMPLING_FIELDS, GANConfig, validate_config
from jdl.gan.quality import frechet_distance, label_report, sample_quality, train_scorer
from jdl.gan.step import create_gan_state, gan_train_step, generate, make_optimizers
from jdl.images import save_image_grid, to_unit_range

# Below this test accuracy the scoring classifier's features say little about
# images, so its Fréchet distances and label matches are flagged as unreliable.
SCORER_MIN_ACCURACY = 0.6
# Goals, reported as the first epoch that meets them: a conditional generator
# whose samples the scorer labels as asked at least this often (the scorer
# itself is ~92% right on real Fashion-MNIST), and a Fréchet distance at most
# this many times the real-vs-real floor.
LABEL_MATCH_GOAL = 0.85
FRECHET_GOAL_RATIO = 3.0


def fixed_noise(config: GANConfig, num_classes: int, side: int = 10):
  """The sample sheet's latent vectors and labels, fixed per seed: side x side
  images; in a conditional run row r is class r (side = num_classes) and every
  row uses the same `side` z's, so a column shows one z across the classes."""
  key = jax.random.key(config.seed + 1, impl=PRNG_IMPL)
  if not num_classes:
    return jax.random.normal(key, (side * side, config.latent_dim)), jnp.zeros((side * side,), jnp.int32)
  z = jax.random.normal(key, (num_classes, config.latent_dim))  # one z per column
  labels = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), num_classes)  # row r: class r
  return jnp.tile(z, (num_classes, 1)), labels


def build_networks(config: GANConfig, image_shape, num_classes: int):
  """(generator, discriminator) of a run: `config`'s widths and conditioning,
  making and judging images of `image_shape` (H, W, C); num_classes 0 for an
  unconditional GAN. The generator's output size follows the data:
  `jdl.models.decoder.upsampling_plan` (28 = 7 * 4: two up-samplings; 32 = 4 * 8: three)."""
  from jdl.models.decoder import Discriminator, Generator
  generator = Generator(tuple(image_shape), config.g_width, num_classes=num_classes,
                        conditioning=config.g_conditioning, **ops.choices(Generator))
  discriminator = Discriminator(config.d_width, num_classes=num_classes,
                                conditioning=config.d_conditioning,
                                class_head=bool(num_classes and config.class_loss_weight > 0),
                                **ops.choices(Discriminator))
  return generator, discriminator


def _first_epoch(history, key: str, meets) -> Optional[dict]:
  """{'epoch', 'train_time_s'} of the first row of `history` whose `key` `meets`, or None."""
  for row in history:
    if row.get(key) is not None and meets(row[key]):
      return {"epoch": row["epoch"], "train_time_s": row["train_time_s"]}
  return None


def fit(config: GANConfig, dataset=None, *, devices=None, progress: bool = True, log=print) -> dict:
  """Trains a DCGAN as `config` says, resuming from its workdir.

  Each epoch: the steps, a grid of samples from fixed noise (PNG and
  TensorBoard), and the Fréchet distance in the scoring classifier's feature
  space; the checkpoint with the lowest distance is kept as the best and is
  the exported generator (samples/best.png, --sample_only). The distance's
  floors are measured the same way once: real training vs real test images
  (the best possible) and the untrained generator. Returns the dict also
  written to WORKDIR/results.json. With more than one device
  (`devices`, default all) each step is data parallel, as in jdl.train.fit:
  BatchNorm statistics and gradients are those of the whole batch.
  """
  from jdl.data import load_dataset
  from jdl.summary import summarize

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
  generator, discriminator = build_networks(config, dataset.input_shape, num_classes)
  workdir = config.workdir or engine.default_workdir("gan", config.dataset, seed=config.seed)
  trained = {k: v for k, v in dataclasses.asdict(config).items() if k not in SAMPLING_FIELDS}
  # What --sample_only needs to rebuild the generator without the data. Both
  # follow from dataset and conditional, which are compared on resume, and
  # runs of an older jdl lack them: not compared.
  derived = {"num_classes": num_classes,
             "class_names": list(dataset.class_names or []) if num_classes else None}
  record = {"task": "gan", **trained, "input_shape": list(dataset.input_shape), **derived}
  with engine.workdir(workdir, record, may_change=tuple(derived)) as record:
    label_args = (jnp.zeros((1,), jnp.int32),) if num_classes else ()
    for name, module, shape in (("Generator", generator, (config.latent_dim,)),
                                ("Discriminator", discriminator, tuple(dataset.input_shape))):
      summary = summarize(module, shape, call_kwargs=({"labels": label_args[0]} if num_classes else None))
      log(f"{name} on {dataset.name} {dataset.input_shape}\n{summary}")

    scorer, classifier_accuracy = train_scorer(config, dataset, workdir, log, devices)
    scorer_warning = None
    if classifier_accuracy < SCORER_MIN_ACCURACY:
      scorer_warning = (f"the scoring classifier is only {classifier_accuracy:.1%} right on real test "
                        f"images (below {SCORER_MIN_ACCURACY:.0%}): its Fréchet distances and label "
                        "matches say little; train it longer (--classifier_epochs) or give a better "
                        "--classifier_workdir")
      log(f"WARNING: {scorer_warning}")
    eval_images = dataset.test[0][:config.num_eval]
    real_features, _ = scorer(eval_images)
    # The best possible distance: as many real training images, scored the same way.
    frechet_real = frechet_distance(real_features, scorer(images[:config.num_eval])[0])

    init_key, data_key, step_key, eval_key = jax.random.split(jax.random.key(config.seed, impl=PRNG_IMPL), 4)
    g_tx, d_tx = make_optimizers(config.learning_rate, config.beta1)
    state = create_gan_state(generator, discriminator, dataset.input_shape, config.latent_dim,
                             init_key, g_tx=g_tx, d_tx=d_tx)
    # The untrained generator, for reference (the same every time: fixed seed).
    initial_quality = sample_quality(state, scorer, real_features, eval_key, len(eval_images), num_classes)
    log(f"Fréchet distance floors, against {len(eval_images)} real test images: {frechet_real:.2f} for "
        f"as many real training images (the best possible), {initial_quality['frechet_distance']:.2f} "
        "for the untrained generator (the worst)")
    state = parallel.replicate(state, mesh)  # before restoring, which keeps these shardings
    parallel.announce(mesh, config.batch_size, log)
    _, batch_sharding = parallel.shardings(mesh)
    data = parallel.replicate({"images": images, "labels": labels}, mesh)
    order_fn = jax.jit(pipeline.epoch_permutation, static_argnums=2)
    z_grid, labels_grid = fixed_noise(config, num_classes)
    side = num_classes or 10
    # Big enough to judge: each sample at least ~84 px; one row per class when conditional.
    scale = max(1, -(-84 // max(dataset.input_shape[:2])))
    row_labels = list(dataset.class_names)[:num_classes] if num_classes and dataset.class_names else None

    def grid(state, name, title):
      images = generate(state, z_grid, labels_grid if num_classes else None)
      return save_image_grid(images, os.path.join(workdir, "samples", name), nrow=side, scale=scale,
                             row_labels=row_labels, title=title)

    def step(state, inputs, index):
      data, order, step_key = inputs
      batch_images, batch_labels = pipeline.take_batch(data["images"], data["labels"], order, index,
                                                       config.batch_size)
      batch_images, batch_labels = parallel.shard_batch((batch_images, batch_labels), batch_sharding)
      return gan_train_step(state, to_unit_range(batch_images), batch_labels,
                            jax.random.fold_in(step_key, state.step), config.real_label,
                            config.class_loss_weight, config.d_augment)

    def evaluate(state, train):
      row = {k: float(v) for k, v in train.items()}
      row.update(sample_quality(state, scorer, real_features, eval_key, len(eval_images), num_classes))
      return row

    def describe(epoch, step, row):
      return (f"epoch {epoch}/{config.epochs}  d_loss {row['d_loss']:.3f}  g_loss {row['g_loss']:.3f}  "
              f"D(x) {row['d_real']:.2f}  D(G(z)) {row['d_fake']:.2f}  Fréchet {row['frechet_distance']:.2f}"
              + (f"  label match {row['label_match_rate']:.1%}" if num_classes else "")
              + f"  {row['epoch_time_s']:.0f}s")

    def finish(state, best, info):
      history = info["history"]
      fd = [r["frechet_distance"] for r in history]
      # The exported generator: the best checkpoint (the final state when no
      # epoch had a finite distance), not the last epoch's.
      best_row = next((r for r in history if r["epoch"] == info["best_epoch"]), None)
      exported_epoch = best_row["epoch"] if best_row else info["epochs_run"]
      ratio = info["best_value"] / frechet_real if best_row and frechet_real > 0 else None
      label_goal = (_first_epoch(history, "label_match_rate", lambda v: v >= LABEL_MATCH_GOAL)
                    if num_classes else None)
      frechet_goal = _first_epoch(history, "frechet_distance",
                                  lambda v: v <= FRECHET_GOAL_RATIO * frechet_real)
      results = {
          "dataset": {"name": dataset.name, "num_train": len(labels), "num_eval": len(eval_images)},
          "frechet_distance_note": ("Fréchet distance between Gaussians fitted to the scoring cnn's "
                                    "pre_logits features of real test images and generated samples; "
                                    "NOT comparable with Inception-based FID"),
          "scoring_classifier_test_accuracy": classifier_accuracy,
          "scoring_classifier_warning": scorer_warning,
          # The floors, each computed as every epoch's distance is.
          "frechet_distance_real": frechet_real,
          "frechet_distance_real_note": (f"{len(eval_images)} real test images against as many real "
                                         "training images: the best a generator can reach"),
          "frechet_distance_initial": initial_quality["frechet_distance"],
          "frechet_distance_by_epoch": fd,
          "frechet_distance_first_epoch": fd[0] if fd else None,
          "frechet_distance_last_epoch": fd[-1] if fd else None,
          "frechet_distance_best": info["best_value"],
          "frechet_distance_best_over_real": ratio,
          # The first epoch (with the training seconds so far) that met each goal, or None.
          "frechet_goal_ratio": FRECHET_GOAL_RATIO,
          "frechet_goal_reached": frechet_goal,
          "label_match_rate_last_epoch": history[-1].get("label_match_rate") if history else None,
          "label_match_rate_best_epoch": best_row.get("label_match_rate") if best_row else None,
          "label_match_chance": (1.0 / num_classes) if num_classes else None,
          "label_match_goal": LABEL_MATCH_GOAL if num_classes else None,
          "label_match_goal_reached": label_goal,
          "exported_generator": {
              "epoch": exported_epoch, "checkpoint": "best" if best_row else "final",
              "samples": grid(best, "best.png", f"DCGAN on {dataset.name}, the exported generator "
                                                f"(epoch {exported_epoch})")},
          "label_report": (label_report(best, scorer, jax.random.fold_in(eval_key, 1))
                           if num_classes and history else None),
          "final_losses": ({k: history[-1][k] for k in ("d_loss", "g_loss", "d_real", "d_fake")}
                           if history else None),
          "samples": grid(state, "final.png", f"DCGAN on {dataset.name}, after epoch {info['epochs_run']}"),
      }
      if fd:
        reached = lambda goal: (f"epoch {goal['epoch']} ({goal['train_time_s']:.0f} s)" if goal
                                else "not reached")
        line = (f"Fréchet distance {results['frechet_distance_initial']:.2f} untrained, {fd[0]:.2f} after "
                f"epoch 1, {fd[-1]:.2f} after epoch {info['epochs_run']}")
        if ratio is not None:
          line += (f" (best {info['best_value']:.2f}, epoch {info['best_epoch']}: {ratio:.2f}x the real "
                   f"floor {frechet_real:.2f}; {FRECHET_GOAL_RATIO:g}x: {reached(frechet_goal)})")
        if num_classes:
          match = [results["label_match_rate_last_epoch"], results["label_match_rate_best_epoch"]]
          line += (f"; label match {match[0]:.1%} last, " if match[0] is not None else "; label match ")
          line += (f"{match[1]:.1%} best epoch " if match[1] is not None else "")
          line += f"(chance {1 / num_classes:.0%}; {LABEL_MATCH_GOAL:.0%}: {reached(label_goal)})"
        log(line + f"; exported generator: epoch {exported_epoch} (samples/best.png); "
            f"results in {workdir}/results.json")
      return results

    panels = {"losses": ["d_loss", "g_loss"], "discriminator outputs": ["d_real", "d_fake"],
              "Fréchet distance (classifier features)": ["frechet_distance"]}
    if num_classes:
      panels["label match rate"] = ["label_match_rate"] + (
          ["d_class_acc_real", "d_class_acc_fake"] if discriminator.class_head else [])
    task = engine.Task(
        state=state, step=step,
        inputs=lambda epoch: (data, order_fn(data_key, epoch, len(labels)), step_key),
        steps_per_epoch=len(labels) // config.batch_size, epochs=config.epochs, evaluate=evaluate,
        describe=describe, finish=finish, best=("frechet_distance", "min"),
        pictures=lambda state, epoch: {"samples": grid(state, f"epoch_{epoch:03d}.png",
                                                       f"DCGAN on {dataset.name}, epoch {epoch}")},
        panels=panels, title=f"DCGAN on {dataset.name}", examples_per_step=config.batch_size,
        bar_metric=("d_loss", "d_loss", 1.0), nan_policy=config.nan_policy,
        keep_checkpoints=config.keep_checkpoints, mesh=mesh)
    _, results = engine.run(task, workdir, record, progress=progress, log=log)
  return results
