"""A DCGAN run's configuration (the flags of experiments.gan) and its checks."""
import dataclasses
import math
import os
from typing import Optional

from jdl.config import option
from jdl.errors import ConfigError
from jdl.models.decoder import DISCRIMINATOR_CONDITIONING, GENERATOR_CONDITIONING


@dataclasses.dataclass
class GANConfig:
  """Everything that defines a DCGAN run."""
  dataset: str = option("shapes", "shapes or shapes_plain (built in, offline), mnist, fashion_mnist, cifar10 or another TFDS image dataset")
  data_dir: Optional[str] = option(None, "where TFDS data is looked for (TFDS default if unset)")
  download: bool = option(True, "allow TFDS to download and prepare a dataset that is not there")
  num_train: int = option(0, "training images: shapes generates this many, TFDS keeps the first N (0: default/all)")
  conditional: bool = option(False, "condition both networks on the class label")
  d_conditioning: str = option("projection", "conditional only: how D sees the label: input (one-hot "
                                         "channels on the image), none (only through the AC-GAN class "
                                         "head) or projection (label embedding dotted "
                                         "with D's last features, Miyato & Koyama 2018)")
  g_conditioning: str = option("concat", "conditional only: how G sees the label: concat (one-hot "
                                         "appended to z), multiply (z times a learned label embedding) or "
                                         "batchnorm (a BatchNorm scale and offset per class in every layer)")
  class_loss_weight: float = option(1.0, "conditional only: weight of an AC-GAN auxiliary class loss "
                                         "(D's extra head classifies real images; G is rewarded when it "
                                         "classifies a fake as the class asked for); 0: no class head")
  d_augment: bool = option(True, "DiffAugment: D sees every real and fake image randomly shifted "
                                  "(up to 1/8 of the side), differentiably")
  latent_dim: int = option(100, "width of the generator's input noise z ~ N(0, 1)")
  g_width: int = option(128, "generator: channels of the first feature map, halved per up-sampling")
  d_width: int = option(32, "discriminator: channels of the first convolution, doubled per down-sampling")
  learning_rate: float = option(2e-4, "Adam step size of both networks (DCGAN: 2e-4)")
  beta1: float = option(0.5, "Adam's first-moment decay (DCGAN: 0.5)")
  real_label: float = option(0.9, "discriminator's target for real images: 0.9 is one-sided label smoothing, 1.0 plain DCGAN")
  batch_size: int = option(64, "real images per step")
  epochs: int = option(10, "passes over the training images")
  classifier_workdir: Optional[str] = option(None, "an experiments.cifar workdir on the same dataset whose "
                                            "classifier scores samples (default: train a cnn in WORKDIR/classifier)")
  classifier_epochs: int = option(30, "epochs of the scoring cnn when jdl trains it (Adam, cosine "
                                     "schedule; on a dataset with a training recipe, e.g. fashion_mnist, "
                                     "that recipe without augmentation (20 epochs give 92.1%), else with "
                                     "augmentation)")
  num_eval: int = option(1000, "real and generated images compared by the Fréchet distance each epoch")
  seed: int = option(0, "seed of initialisation, data order and noise; with --sample_only the seed of "
                        "the samples' noise (the same seed draws the same picture)")
  workdir: Optional[str] = option(None, "checkpoints, sample grids, metrics go here; rerunning resumes (default runs/gan-DATASET-seedS)")
  keep_checkpoints: int = option(2, "latest checkpoints kept for resume")
  nan_policy: str = option("stop", "on a non-finite loss or gradient: stop (naming the step) or skip "
                                   "the step (counted in metrics.jsonl); either way it is not applied")
  # --- sampling a trained run (no training, no scoring) ---
  sample_only: bool = option(False, "write a grid of samples from --workdir's best checkpoint (else its "
                                    "latest) to WORKDIR/samples and print its path; no training")
  label: Optional[int] = option(None, "--sample_only, conditional runs only: the class to draw (default: "
                                      "every class, one row each)")
  num: int = option(64, "--sample_only: images in the grid (every class: num // classes of each)")


# Flags that say what to sample from a trained run, not what is trained: never
# part of a run's config.json.
SAMPLING_FIELDS = ("sample_only", "label", "num")


def validate_config(config: GANConfig) -> None:
  """Raises ConfigError (one line) for a bad value, before anything loads."""
  def check(ok, message):
    if not ok:
      raise ConfigError(message)
  check(math.isfinite(config.learning_rate) and config.learning_rate > 0,
        f"learning_rate must be > 0, got {config.learning_rate}")
  check(0.0 <= config.beta1 < 1.0, f"beta1 must be in [0, 1), got {config.beta1}")
  check(math.isfinite(config.class_loss_weight) and config.class_loss_weight >= 0,
        f"class_loss_weight must be >= 0, got {config.class_loss_weight}")
  check(config.d_conditioning in DISCRIMINATOR_CONDITIONING,
        f"d_conditioning must be one of {', '.join(DISCRIMINATOR_CONDITIONING)}, "
        f"got {config.d_conditioning!r}")
  check(not (config.conditional and config.class_loss_weight > 0 and config.d_conditioning == "input"),
        "class_loss_weight > 0 needs --d_conditioning=projection or none: with input label channels "
        "D's class head reads the label off its input, not the image")
  check(not (config.conditional and config.class_loss_weight == 0 and config.d_conditioning == "none"),
        "--d_conditioning=none needs class_loss_weight > 0: else nothing tells G what its label means")
  check(config.g_conditioning in GENERATOR_CONDITIONING,
        f"g_conditioning must be one of {', '.join(GENERATOR_CONDITIONING)}, got {config.g_conditioning!r}")
  check(0.5 < config.real_label <= 1.0, f"real_label must be in (0.5, 1], got {config.real_label}")
  for name in ("latent_dim", "g_width", "d_width", "batch_size", "keep_checkpoints",
               "classifier_epochs"):
    check(getattr(config, name) >= 1, f"{name} must be >= 1, got {getattr(config, name)}")
  check(config.num_eval >= 2, f"num_eval must be >= 2, got {config.num_eval}")
  check(config.num >= 1, f"num must be >= 1, got {config.num}")
  check(config.label is None or config.label >= 0, f"label must be >= 0, got {config.label}")
  check(config.label is None or config.sample_only, "--label applies to --sample_only only")
  check(not config.sample_only or config.workdir, "--sample_only needs the --workdir of a trained run")
  check(config.epochs >= 0, f"epochs must be >= 0, got {config.epochs}")
  check(config.num_train >= 0, f"num_train must be >= 0, got {config.num_train}")
  check(config.nan_policy in ("stop", "skip"), f"nan_policy must be stop or skip, got {config.nan_policy!r}")
  check(not config.classifier_workdir
        or os.path.exists(os.path.join(config.classifier_workdir, "config.json")),
        f"--classifier_workdir {config.classifier_workdir} holds no experiments.cifar run "
        "(no config.json)")
