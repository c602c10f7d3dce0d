"""An optional Weights & Biases metric writer (``config.wandb``), beside TensorBoard.

  --config.wandb.project=my-project [--config.wandb.entity=team]
      [--config.wandb.name=run-name] [--config.wandb.mode=offline]

Off while ``config.wandb.project`` is empty (the default). wandb is not a dependency
of vit_jax: a run that turns it on without it installed stops at setup with one
error naming the setting. clu (our writer layer) has no W&B writer, so this is a clu
``MetricWriter`` written here: the trainers' scalars, images, histograms and hparams
reach W&B through the same calls that write the TensorBoard event files (a
``MultiWriter`` of both, ``common.make_writer``). The W&B run id is kept in the
workdir, so a resumed run continues the same W&B run.
"""

import importlib
from typing import Any, Callable, Mapping, Optional

import numpy as np
from clu import metric_writers
from etils import epath

RUN_ID_FILE = "wandb_run_id"


def enabled(config: Any) -> bool:
  settings = config.get("wandb") if config is not None else None
  return bool(settings and settings.get("project"))


def _import_wandb(project: str):
  try:
    return importlib.import_module("wandb")
  except ImportError as e:
    raise ImportError(
        f"config.wandb.project={project!r} turns on the Weights & Biases writer, but "
        f"wandb is not installed ({e}): `pip install wandb`, or leave "
        "config.wandb.project empty") from e


class WandbWriter(metric_writers.MetricWriter):
  """Writes to one W&B run; ``step`` is W&B's step (the training step)."""

  def __init__(self, wandb: Any, run: Any):
    self._wandb = wandb
    self._run = run

  def _log(self, step: int, data: Mapping[str, Any]) -> None:
    if data:
      self._run.log(dict(data), step=int(step))

  def write_summaries(self, step, values, metadata=None):
    # Raw summaries carry no type W&B could render; scalar ones go as scalars.
    self._log(step, {k: np.asarray(v).item() for k, v in values.items()
                     if np.asarray(v).ndim == 0})

  def write_scalars(self, step, scalars):
    self._log(step, {k: float(v) for k, v in scalars.items()})

  def write_images(self, step, images):
    # clu's images are [N, H, W, C] (or [H, W, C]) in [0, 1] or uint8.
    logged = {}
    for key, value in images.items():
      value = np.asarray(value)
      if value.dtype != np.uint8:
        value = (np.clip(value, 0.0, 1.0) * 255).round().astype(np.uint8)
      batch = value if value.ndim == 4 else value[None]
      logged[key] = [self._wandb.Image(image) for image in batch]
    self._log(step, logged)

  def write_videos(self, step, videos):
    self._log(step, {k: self._wandb.Video(np.asarray(v)) for k, v in videos.items()})

  def write_audios(self, step, audios, *, sample_rate):
    self._log(step, {k: [self._wandb.Audio(np.asarray(a), sample_rate=sample_rate)
                         for a in np.asarray(v)] for k, v in audios.items()})

  def write_texts(self, step, texts):
    self._log(step, {k: self._wandb.Html(f"<pre>{v}</pre>") for k, v in texts.items()})

  def write_histograms(self, step, arrays, num_buckets=None):
    self._log(step, {k: self._wandb.Histogram(
        np.asarray(v).ravel(), num_bins=min((num_buckets or {}).get(k, 64), 512))
                     for k, v in arrays.items()})

  def write_hparams(self, hparams):
    self._run.config.update(dict(hparams), allow_val_change=True)

  def flush(self):
    pass  # wandb uploads in its own process

  def close(self):
    self._run.finish()


def from_config(config: Any, workdir: epath.PathLike,
                write_text: Callable[[epath.Path, str], None]) -> Optional[WandbWriter]:
  """The writer ``config.wandb`` asks for (None when off); call on the main process.
  ``write_text(path, text)`` keeps the run id (``common.write_text_atomic``)."""
  if not enabled(config):
    return None
  settings = config.wandb
  wandb = _import_wandb(settings.project)
  workdir = epath.Path(workdir)
  id_file = workdir / RUN_ID_FILE
  run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
  kwargs = {key: settings.get(key) for key in ("entity", "name", "mode")
            if settings.get(key)}
  local = "://" not in str(workdir)  # wandb's own files need a local directory
  run = wandb.init(project=settings.project, id=run_id, resume="allow",
                   dir=str(workdir) if local else None,
                   config=config.to_dict() if hasattr(config, "to_dict") else None,
                   **kwargs)
  if not id_file.exists():
    write_text(id_file, run.id)
  return WandbWriter(wandb, run)
