"""Run feedback: metrics.jsonl, TensorBoard event files and results.json.

One row per epoch goes to `WORKDIR/metrics.jsonl` (easy to read back with
pandas or a few lines of Python) and to TensorBoard event files under
`WORKDIR/tb` (written by tensorboardX, so no TensorFlow is needed).
"""
import json
import math
import os
from typing import Dict, List

import numpy as np

from jdl.parallel import is_primary


def read_jsonl(path: str) -> List[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _json_safe(value):
  """NaN/inf are not JSON: write them as strings so the file stays parseable."""
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricWriter:
  """Appends per-epoch metrics to metrics.jsonl and TensorBoard.

  On resume, rows of epochs after the restored checkpoint (written before the
  run died but never checkpointed) are dropped, so the history always matches
  the parameters. In a multi-host run only process 0 writes (every process
  keeps the history, for its plots and results).

  Arguments:
    workdir: the run's directory.
    resume_epoch: the last completed epoch of the restored checkpoint (0: fresh).
  """

  def __init__(self, workdir: str, resume_epoch: int = 0):
    from tensorboardX import SummaryWriter
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.history = [r for r in read_jsonl(self.path) if r.get("epoch", 0) <= resume_epoch]
    self._tb = None
    if is_primary():
      with open(self.path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in self.history)
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, epoch: int, metrics: Dict[str, float]) -> None:
    row = {"epoch": epoch, "step": step, **{k: _json_safe(float(v)) for k, v in metrics.items()}}
    self.history.append(row)
    if self._tb is None:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for name, value in metrics.items():
      self._tb.add_scalar(name, float(value), step)
    self._tb.flush()

  def add_image(self, tag: str, png_path: str, step: int) -> None:
    """Logs a PNG file (e.g. a sample grid) to TensorBoard's images tab."""
    if self._tb is None:
      return
    from PIL import Image
    image = np.asarray(Image.open(png_path).convert("RGB"))  # (H, W, 3) uint8
    self._tb.add_image(tag, image, step, dataformats="HWC")
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def write_json(path: str, obj) -> None:
  """Writes JSON atomically (temp file + rename): never a half-written file.
  Only process 0 of a multi-host run writes."""
  if not is_primary():
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
    f.write("\n")
  os.replace(tmp, path)
