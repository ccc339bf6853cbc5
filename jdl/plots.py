"""Plots people would rather look at than read: learning curves, one panel per group of metrics."""
import os
from typing import List

from jdl.parallel import is_primary


def _pyplot():
  """matplotlib.pyplot on the file-only Agg backend, imported on first use.

  Imported lazily because importing it is a noticeable part of every
  entrypoint's start-up, and a run draws its first plot only after its first
  epoch.
  """
  import matplotlib
  matplotlib.use("Agg")  # Files only; no display needed.
  import matplotlib.pyplot as plt
  return plt


def plot_panels(history: List[dict], path: str, panels: dict, title: str = "",
                x: str = "epoch") -> str:
  """One panel per entry of `panels` {panel title: [row keys]}, a line per key.

  Arguments:
    history: rows of metrics.jsonl.
    path: the PNG file to write.
    panels: e.g. {"losses": ["d_loss", "g_loss"], "Fréchet distance": ["frechet_distance"]};
      a panel may name its own horizontal axis: {"x": "train_time_s", "keys": [...]}.
    title: a figure title.
    x: the row key on the horizontal axis.
  Returns:
    `path` (written by process 0 only in a multi-host run).
  """
  if not is_primary():
    return path
  fig, axes = _pyplot().subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
  for ax, (name, keys) in zip(axes[0], panels.items()):
    panel_x, keys = (keys["x"], keys["keys"]) if isinstance(keys, dict) else (x, keys)
    for key in keys:
      points = [(r[panel_x], r[key]) for r in history if isinstance(r.get(key), float)]
      if points:
        ax.plot(*zip(*points), "-o", markersize=3, label=key)
    ax.set_xlabel({"train_time_s": "training seconds"}.get(panel_x, panel_x))
    ax.set_title(name)
    ax.grid(alpha=0.3)
    ax.legend()
  return _save(fig, path, title)


def _save(fig, path: str, title: str = "") -> str:
  """Titles, lays out and writes `fig` as a PNG (creating its directory); returns `path`."""
  from matplotlib.ticker import MaxNLocator
  for ax in fig.axes:  # epochs and steps are whole numbers, even on a 2-epoch run
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  _pyplot().close(fig)
  return path
