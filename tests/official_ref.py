"""Runs the PyTorch re-creations of official implementations; writes outputs to ``.npz``.

For the families timm does not have, ``tests/<family>_official_ref.py`` re-creates the
official model (module names, state-dict names, forward). PyTorch and TensorFlow abort
when imported into one process, so tests run this file as a subprocess
(``helpers.run_timm_reference(jobs, directory, script="official_ref.py")``)::

  python tests/official_ref.py jobs.json

Each job: ``{"family": "rmt", "config": {...}, "input": "x.npy" (NHWC float32), "out":
"y.npz", "seed": 0, "randomize": 0.1}``: builds ``<family>_official_ref.build(**config)``,
fills every parameter and BatchNorm statistic with noise (``torch_random.randomize``) and
runs ``<family>_official_ref.forward`` in eval mode. The ``.npz`` holds ``state/<name>``
for every state-dict entry, ``logits``, ``features``, ``stage/<i>`` (NHWC maps) and
``num_params``. A job ``{"family": ..., "counts": true, "out": ...}`` instead builds every
official configuration in the module's ``CONFIGS`` on the meta device (nothing is
allocated) and writes ``num_params/<name>``.
"""

import importlib
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_random  # noqa: E402  pylint: disable=g-import-not-at-top


def run(job: dict) -> None:
  reference = importlib.import_module(f"{job['family']}_official_ref")
  if job.get("counts"):
    counts = {}
    for name, config in reference.CONFIGS.items():
      with torch.device("meta"):
        model = reference.build(**config)
      counts[f"num_params/{name}"] = np.array(sum(p.numel() for p in model.parameters()))
    np.savez(job["out"], **counts)
    return
  torch.manual_seed(job.get("seed", 0))
  model = reference.build(**job["config"])
  torch_random.randomize(model, job.get("randomize", 0.1),
                     torch.Generator().manual_seed(job.get("seed", 0)))
  model.eval()
  images = torch.from_numpy(np.load(job["input"])).permute(0, 3, 1, 2).contiguous()
  out = {f"state/{k}": v.detach().numpy() for k, v in model.state_dict().items()}
  with torch.no_grad():
    logits, features, stages = reference.forward(model, images)
  out["logits"], out["features"] = logits.numpy(), features.numpy()
  for i, stage in enumerate(stages):
    out[f"stage/{i}"] = stage.numpy()
  out["num_params"] = np.array(sum(p.numel() for p in model.parameters()))
  np.savez(job["out"], **out)


if __name__ == "__main__":
  torch.set_num_threads(2)
  for spec in json.load(open(sys.argv[1])):
    run(spec)
