"""Runs the PyTorch re-creations of official models (``tests/*_official.py``).

PyTorch and TensorFlow abort when imported into one process, so tests run this file
as a subprocess (``helpers.run_official_reference``)::

  python tests/official_ref.py jobs.json

Each job: ``{"module": "vig_official", "model": "vig_tiny", "kwargs": {...},
"input": "x.npy" (NHWC float32), "out": "y.npz", "seed": 0, "randomize": 0.1}``
builds ``module.create(model, **kwargs)``, fills every parameter with random values
(``timm_ref.randomize``) and writes ``state/<name>`` for every state-dict entry,
``logits``, ``features``, ``intermediates/<i>`` (what the module's
``forward_intermediates`` returns) and ``num_params``. A job with ``"count": true``
(and no input) builds the model on the meta device and writes only ``num_params``.
"""

import importlib
import json
import sys

import numpy as np
import torch

from timm_ref import randomize


def run(job: dict) -> None:
  module = importlib.import_module(job["module"])
  if job.get("count"):
    with torch.device("meta"):
      model = module.create(job["model"], **job.get("kwargs", {}))
    np.savez(job["out"], num_params=sum(p.numel() for p in model.parameters()))
    return
  torch.manual_seed(job.get("seed", 0))
  model = module.create(job["model"], **job.get("kwargs", {})).eval()
  generator = torch.Generator().manual_seed(job.get("seed", 0))
  randomize(model, job.get("randomize", 0.1), generator)
  images = torch.from_numpy(np.load(job["input"])).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    logits, features, maps = model.forward_intermediates(images)
  out = {f"state/{k}": v.numpy() for k, v in model.state_dict().items()}
  out.update(logits=logits.numpy(), features=features.numpy(),
             num_params=sum(p.numel() for p in model.parameters()))
  out.update({f"intermediates/{i}": m.numpy() for i, m in enumerate(maps)})
  np.savez(job["out"], **out)


def main(path: str) -> None:
  with open(path) as f:
    jobs = json.load(f)
  for job in jobs:
    run(job)


if __name__ == "__main__":
  main(sys.argv[1])
