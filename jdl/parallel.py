"""Data parallelism over devices with jax.sharding, and multi-host start-up.

With more than one device, every training loop (`train.fit` for cifar,
sequence and transfer; `gan.fit`, `text.fit`, `colorize.fit`) lays out a
one-axis Mesh ('data') over them: the dataset, parameters, optimizer state
and BatchNorm statistics are replicated, and each batch is sharded along its
first axis by a sharding constraint inside the jitted step. XLA's SPMD
partitioner then runs each device on its slice and all-reduces the gradients
(and BatchNorm's batch statistics, so they are those of the whole batch, as
on one device). The update is the same computation as on one device, up to
the order of float additions in those reductions. The loops also trace their
steps under `jax.set_mesh` (`within`), where recurrent layers split their
time loops over the devices themselves (`shard_map`, jdl.models.rnn).

On a CPU-only host, `--cpu_devices=N` (`set_cpu_devices`) makes the CPU N
devices, one per core being the useful choice: XLA:CPU runs a loop body on
one thread, so that is how a recurrent model's loop uses every core. Left
unset, the entrypoints that train a recurrent model pick N themselves
(`auto_cpu_devices`); everything else keeps one device, since XLA:CPU's
convolutions and matmuls already use every core inside one device.

Multi-host: start every process with the same flags plus
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`
(`initialize_distributed` calls `jax.distributed.initialize`); `jax.devices()`
then lists the devices of all hosts and the same mesh spans them. The
workdir must be one shared directory: orbax writes each checkpoint from all
processes together, and jdl's own files (metrics.jsonl, TensorBoard events,
config.json, results.json, plots) are written by process 0 only
(`is_primary`), so that they hold each row once.
"""
import functools
import os
from typing import Callable, Optional, Sequence, Tuple

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdl.errors import ConfigError

AXIS = "data"


def is_primary() -> bool:
  """Whether this process writes the run's files: process 0 (always, on one host)."""
  return jax.process_index() == 0


def context_data_devices() -> int:
  """Devices along the 'data' axis of the mesh set by `jax.set_mesh` (1 without one).

  Read while tracing, by layers that split their own work over the batch
  (jdl.models.rnn's recurrences)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or AXIS not in mesh.axis_names:
    return 1
  return mesh.shape[AXIS]


def within(mesh: Optional[Mesh], fn: Callable) -> Callable:
  """`fn` called inside `jax.set_mesh(mesh)` (unchanged without a mesh), so
  that layers traced by it see the data axis (`context_data_devices`)."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)
  return call


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Optional[Mesh]:
  """A 1-D mesh over `devices` (default: all), or None for a single device."""
  devices = list(devices) if devices is not None else jax.devices()
  if len(devices) <= 1:
    return None
  return Mesh(devices, (AXIS,))


def shardings(mesh: Optional[Mesh]) -> Tuple[Optional[NamedSharding], Optional[NamedSharding]]:
  """(replicated, batch-sharded along axis 0) for `mesh`; (None, None) without one."""
  if mesh is None:
    return None, None
  return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(AXIS))


def replicate(tree, mesh: Optional[Mesh]):
  """`tree` on every device of `mesh`, or on the default device without one."""
  return jax.device_put(tree, None if mesh is None else NamedSharding(mesh, PartitionSpec()))


def shard_batch(tree, batch_sharding: Optional[NamedSharding]):
  """Inside a jitted step: every array of `tree` split along axis 0 over the mesh.

  A sharding constraint, not a transfer: the batch is gathered on every
  device from the replicated dataset, and XLA keeps each device's slice.
  """
  return tree if batch_sharding is None else jax.lax.with_sharding_constraint(tree, batch_sharding)


def announce(mesh: Optional[Mesh], batch_size: int, log: Callable[[str], None]) -> None:
  """Logs how a data-parallel run splits its batch (nothing on one device)."""
  if mesh is not None:
    cpu = mesh.devices.flat[0].platform == "cpu" and jax.process_count() == 1
    log(f"Data parallel over {mesh.size} devices: batch {batch_size} = "
        f"{mesh.size} x {batch_size // mesh.size}"
        + (f" (the CPU split into {mesh.size}; --cpu_devices sets how many)" if cpu else ""))


def check_batch_size(batch_size: int, mesh: Optional[Mesh]) -> None:
  """Each device takes an equal slice of every batch."""
  if mesh is not None and batch_size % mesh.size:
    raise ConfigError(f"batch_size {batch_size} does not split evenly over {mesh.size} devices; "
                      f"use a multiple of {mesh.size}")


def round_up(size: int, mesh: Optional[Mesh]) -> int:
  """`size` rounded up to a multiple of the device count (eval batches are padded)."""
  n = 1 if mesh is None else mesh.size
  return -(-size // n) * n


def set_cpu_devices(count: int) -> None:
  """Makes the CPU backend `count` devices (before anything touches a device).

  XLA:CPU runs each while-loop body on one thread, so on a CPU-only host a
  recurrent model uses one core per device: with one device per core, the
  training loops' data parallelism (and the recurrent layers' per-device
  loops) put every core to work.
  """
  if count < 1:
    raise ConfigError(f"cpu_devices must be >= 1, got {count}")
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError as e:  # the backend already started
    raise ConfigError(f"cpu_devices must be set before JAX starts its CPU backend ({e})") from None


RECURRENT_MODELS = ("rnn", "lstm", "gru")
# Below ~32 sequences per device the per-step (B/N, H) @ (H, 4H) matmul is too
# small to run a core at its peak, and the split gained nothing (the text model
# at 16 per device; BUILD_NOTES.md).
MIN_BATCH_PER_CPU_DEVICE = 32


def auto_cpu_devices(model: str, batch_size: int, implementation: Optional[str] = None,
                     cores: Optional[int] = None) -> int:
  """How many CPU devices training `model` should split the host into.

  For a recurrent model (not on the cuDNN kernel): the largest N <= cores
  that divides `batch_size` into slices of at least MIN_BATCH_PER_CPU_DEVICE;
  else, and for every other model, 1. On 2 cores, lstm at batch 64: 2 (its
  step is faster than on one device; A/B in BUILD_NOTES.md 3.8).

  Arguments:
    model: a model name ('lstm', 'cnn', ...).
    batch_size: examples per training step.
    implementation: the recurrent layers' ('scan', 'cudnn' or None).
    cores: CPU cores to use; default: those this process may run on.
  """
  if model not in RECURRENT_MODELS or implementation == "cudnn":
    return 1
  if cores is None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  for n in range(min(cores, batch_size // MIN_BATCH_PER_CPU_DEVICE), 1, -1):
    if batch_size % n == 0:
      return n
  return 1


def forced_host_devices() -> bool:
  """Whether XLA_FLAGS already sets the CPU device count (as the sharding tests do)."""
  return "--xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int) -> None:
  """Joins a multi-host run (before anything touches a device)."""
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ConfigError(f"process_id must be in [0, num_processes), got {process_id} of {num_processes}")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
