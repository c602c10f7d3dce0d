"""Runs timm models with random weights; writes state dicts and outputs to ``.npz``.

PyTorch and TensorFlow abort when imported into one process, so tests run this file
as a subprocess (see ``conftest.timm_reference``)::

  python tests/timm_ref.py jobs.json

Each job: ``{"model": timm name, "kwargs": {...}, "input": "x.npy" (NHWC float32),
"out": "y.npz", "seed": 0, "randomize": 0.1 or null, "intermediates": false,
"stage_depths": null or [n0, n1, ...]}``. ``stage_depths`` keeps the first ``n_i``
blocks of ``model.stages[i].blocks``: a shallower model with the real widths, for
timm constructors that take no depth argument (e.g. the MetaFormers). Such a model is
built on the meta device (no full-size initialisation) and needs ``randomize``, which
then fills every tensor it has. Optionally ``"class": "timm.models.gcvit.GlobalContextVit"``
builds that class with ``kwargs`` directly (for models whose registered names fix
settings such as depths), and ``"one_pass": true`` (with ``intermediates``) takes logits
and features from the single ``forward_intermediates`` pass (check that this holds for
the model).
The ``.npz`` holds ``state/<name>`` for every state-dict entry, ``logits``,
``features`` (``forward_features``; ``features/<i>`` per branch when it returns a list),
``intermediates/<i>`` (``forward_intermediates``,
NCHW maps or NLC tokens as timm returns them) and ``num_params``.

Optional: ``"load": path`` loads weights after the random init (``.npz`` through
timm's own vision_transformer ``.npz`` loader, ``model.load_pretrained``; anything
else through ``timm.models.load_checkpoint``). A job with ``"function"`` instead of
``"model"`` calls a timm helper on the input array (not permuted) and writes
``output``: ``resample_abs_pos_embed`` or ``resize_rel_pos_bias_table_simple``
with ``kwargs``.
"""

import importlib
import json
import sys

import numpy as np
import timm
import torch

from torch_random import randomize  # noqa: F401  (also used by open_clip_ref)


def create_shallow(job: dict) -> torch.nn.Module:
  """The job's model with only the first ``stage_depths[i]`` blocks of each stage."""
  if not job.get("randomize"):
    raise ValueError("stage_depths needs randomize: the model is built uninitialised")
  with torch.device("meta"):  # the full-size model is never initialised
    model = timm.create_model(job["model"], pretrained=False, **job.get("kwargs", {}))
  for stage, depth in zip(model.stages, job["stage_depths"]):
    stage.blocks = stage.blocks[:depth]
  kept = [n for n, _ in model.named_buffers()
          if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
  if kept:
    raise ValueError(f"stage_depths cannot rebuild the buffers {kept[:3]} of "
                     f"{job['model']}; pass a depth argument in kwargs instead")
  model = model.to_empty(device="cpu")
  for name, buffer in model.named_buffers():
    if name.endswith("num_batches_tracked"):
      buffer.zero_()
  return model
FUNCTIONS = ("resample_abs_pos_embed", "resize_rel_pos_bias_table_simple")


def run_function(job: dict) -> None:
  from timm import layers  # pylint: disable=g-import-not-at-top
  if job["function"] not in FUNCTIONS:
    raise ValueError(f"unknown function {job['function']!r}")
  x = torch.from_numpy(np.load(job["input"]))
  out = getattr(layers, job["function"])(x, **job.get("kwargs", {}))
  np.savez(job["out"], output=out.numpy())


def run(job: dict) -> None:
  if "function" in job:
    run_function(job)
    return
  torch.manual_seed(job.get("seed", 0))
  if job.get("stage_depths"):
    model = create_shallow(job)
  elif job.get("class"):
    module, name = job["class"].rsplit(".", 1)
    model = getattr(importlib.import_module(module), name)(**job.get("kwargs", {}))
  else:
    model = timm.create_model(job["model"], pretrained=False, **job.get("kwargs", {}))
  if job.get("randomize"):
    randomize(model, job["randomize"], torch.Generator().manual_seed(job.get("seed", 0)))
  if job.get("load"):
    if job["load"].endswith(".npz"):
      model.load_pretrained(job["load"])
    else:
      timm.models.load_checkpoint(model, job["load"], strict=True)
  model.eval()
  images = torch.from_numpy(np.load(job["input"])).permute(0, 3, 1, 2).contiguous()
  out = {f"state/{k}": v.detach().numpy() for k, v in model.state_dict().items()}
  with torch.no_grad():
    if job.get("intermediates") and job.get("one_pass"):
      # One forward instead of three: the final output of forward_intermediates is
      # forward_features' for the hierarchical models that ask for this.
      final, feats = model.forward_intermediates(images)
      out["logits"] = model.forward_head(final).numpy()
      out["features"] = final.numpy()
    else:
      out["logits"] = model(images).numpy()
      features = model.forward_features(images)
      if isinstance(features, (list, tuple)):  # multi-branch models (CrossViT)
        for i, f in enumerate(features):
          out[f"features/{i}"] = f.numpy()
      else:
        out["features"] = features.numpy()
      feats = (model.forward_intermediates(images, intermediates_only=True)
               if job.get("intermediates") else [])
    for i, f in enumerate(feats):
      out[f"intermediates/{i}"] = f.numpy()
  out["num_params"] = np.array(sum(p.numel() for p in model.parameters()))
  np.savez(job["out"], **out)


if __name__ == "__main__":
  torch.set_num_threads(2)
  for job in json.load(open(sys.argv[1])):
    run(job)
