"""Training a GAN: state, the alternating update step, sampling and evaluation.

The pieces, by module (all importable from `jdl.gan`):
  step      GANState (both networks' TrainStates as one pytree),
            create_gan_state, make_optimizers (DCGAN's Adam(2e-4, b1=0.5)),
            gan_train_step (one pure, jittable update of D, then of G) and
            generate (images from latent vectors, BatchNorm in eval mode).
  quality   frechet_distance, the scoring classifier (Scorer, train_scorer),
            sample_quality and label_report.
  config    GANConfig (experiments.gan's flags) and validate_config.
  loop      fit: the experiment's loop, with checkpoints, sample grids and
            scores each epoch, the Fréchet distance's floors, and the best
            generator exported.
  sample    sample_only: a grid from a trained run's best checkpoint
            (experiments.gan --sample_only), and restore_generator.
Pixel conversions and image grids (to_unit_range, to_uint8, save_image_grid)
live in `jdl.images` and are re-exported here.

Images live in [-1, 1] throughout: the generator ends in tanh, and real images
must be scaled the same way (`to_unit_range`) before they reach the
discriminator.

    state = create_gan_state(Generator((32, 32, 3), 128), Discriminator(64),
                             (32, 32, 3), latent_dim=100, rng=key)
    step = jax.jit(gan_train_step, donate_argnums=0)
    state, metrics = step(state, to_unit_range(images), labels, rng)
"""
from jdl.gan.config import GANConfig, validate_config
from jdl.gan.loop import build_networks, fit, fixed_noise
from jdl.gan.quality import Scorer, frechet_distance, label_report, sample_quality, train_scorer
from jdl.gan.sample import restore_generator, sample_only
from jdl.gan.step import GANState, create_gan_state, gan_train_step, generate, make_optimizers
from jdl.images import save_image_grid, to_uint8, to_unit_range

__all__ = ["GANConfig", "GANState", "Scorer", "build_networks", "create_gan_state", "fit",
           "fixed_noise", "frechet_distance", "gan_train_step", "generate", "label_report",
           "make_optimizers", "restore_generator", "sample_only", "sample_quality", "save_image_grid",
           "to_uint8", "to_unit_range", "train_scorer", "validate_config"]
