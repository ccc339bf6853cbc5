"""Transfer learning: the course notes' four scenarios and bottleneck features.

A pretrained network is adjusted to a new dataset in one of four ways, chosen by
the new dataset's size and its similarity to the original one:

  small_similar    drop the last layer, add a new Dense head for the new classes,
                   freeze every pretrained weight, train the head.
  small_different  also cut away the later pretrained layers (the hidden Dense
                   layers, else the later half), keep the earlier ones frozen,
                   add the new head (flatten or GAP, then Dense).
  large_similar    new head, the rest initialised from the pretrained weights,
                   fine-tune everything.
  large_different  new head and train from scratch, or fine-tune from the
                   pretrained weights (`fine_tune_from_pretrained`).

The pieces, by module (all importable from `jdl.transfer`):
  model       TransferModel: a pretrained model cut at a named feature (its
              `cut_at` field: later layers are never created) + a new `Head`.
  weights     restore_matching puts pretrained arrays into a new model's
              variables, naming the parameter path and both shapes on a
              mismatch; Pretrained is a model's config and variables, from an
              experiments.cifar workdir, a .safetensors ResNet or a fresh
              pretraining run.
  features    bottleneck_features / FeatureCache: the frozen part run once over
              the data, its outputs kept in WORKDIR as a NumPy archive (never
              pickle) to train the head on.
  tasks       the task families, by --dataset (FAMILIES): shapes_tasks, the
              offline demonstration (source: shapes classes 0-4; similar:
              classes 5-9 in the same style; different: classes 5-9 as line
              sketches) and fashion_mnist_tasks, on real images (source:
              T-shirt/top..Coat; similar: Sandal..Ankle boot; different: grey
              28x28 shapes); small and large sets.
  experiment  run, experiments.transfer: pretrain (or load), run the scenarios
              and their from-scratch baselines, write a table.

Freezing itself is `jdl.optim.freeze` (optax multi_transform + set_to_zero) via
`jdl.train.fit(..., frozen=patterns)`, which also keeps the BatchNorm
statistics of frozen layers. A frozen backbone here also runs in inference
mode (BatchNorm uses its running statistics, dropout off, as Keras does for
layers with trainable=False) and sits behind stop_gradient, so no backward pass
goes through it.

    backbone = build_model('resnet20')                 # pretrained elsewhere
    model = TransferModel(backbone.clone(cut_at='layer2'), num_classes=5,
                          train_backbone=False)
    variables = restore_matching(init_variables(model, (32, 32, 3)), pretrained)
    state, results = train.fit(config, data, model=model, variables=variables,
                               frozen=FROZEN_BACKBONE)
"""
from jdl.transfer.experiment import (FLAG_DEFAULTS, SCENARIOS, TransferConfig, format_table,
                                     pretrained_model, run, run_scenario, scratch_baseline,
                                     target_tasks, validate, with_sizes)
from jdl.transfer.features import FeatureCache, bottleneck_features, fingerprint
from jdl.transfer.model import (FROZEN_BACKBONE, Head, TransferModel, cut_model, default_cut,
                                feature_names, init_variables)
from jdl.transfer.tasks import (FAMILIES, FASHION_SOURCE, FASHION_TARGET, SOURCE_CLASSES, TARGET_CLASSES,
                                TaskFamily, fashion_mnist_tasks, grey, shapes_tasks, sketch)
from jdl.transfer.weights import Pretrained, load_safetensors_resnet, load_workdir, restore_matching

__all__ = ["FAMILIES", "FASHION_SOURCE", "FASHION_TARGET", "FLAG_DEFAULTS", "FROZEN_BACKBONE",
           "FeatureCache", "Head", "Pretrained", "SCENARIOS", "SOURCE_CLASSES", "TARGET_CLASSES",
           "TaskFamily", "TransferConfig", "TransferModel", "bottleneck_features", "cut_model",
           "default_cut", "fashion_mnist_tasks", "feature_names", "fingerprint", "format_table", "grey",
           "init_variables", "load_safetensors_resnet", "load_workdir", "pretrained_model",
           "restore_matching", "run", "run_scenario", "scratch_baseline", "shapes_tasks", "sketch",
           "target_tasks", "validate", "with_sizes"]
