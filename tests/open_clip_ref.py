"""Runs open_clip models with random weights; writes state dicts and embeddings to .npz.

PyTorch and TensorFlow abort when imported into one process, so tests run this file
as a subprocess (``helpers.run_open_clip_reference``)::

  python tests/open_clip_ref.py jobs.json

Each job: ``{"model": open_clip name, "images": "x.npy" (NHWC float32), "tokens":
"t.npy" (int), "out": "y.npz", "seed": 0, "randomize": 0.02 or null}``; a job with
``"kind": "timm"`` is handed to ``timm_ref.run`` instead (one torch start-up for both).
The ``.npz`` holds ``state/<name>`` for every state-dict entry, ``image_embedding`` and
``text_embedding`` (``encode_image``/``encode_text`` without normalisation),
``image_normalized``, ``text_normalized`` and ``num_params``.
"""

import json
import os
import sys

import numpy as np
import open_clip
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timm_ref  # noqa: E402  pylint: disable=g-import-not-at-top


def run(job: dict) -> None:
  torch.manual_seed(job.get("seed", 0))
  model = open_clip.create_model(job["model"], pretrained=None, device="cpu",
                                 precision="fp32")
  if job.get("randomize"):
    # open_clip zero-initialises biases and sets norms to 1/0, which would let a
    # converter that confuses those tensors pass.
    timm_ref.randomize(model, job["randomize"],
                       torch.Generator().manual_seed(job.get("seed", 0)))
    with torch.no_grad():
      model.logit_scale.fill_(np.log(1 / 0.07))
  model.eval()
  images = torch.from_numpy(np.load(job["images"])).permute(0, 3, 1, 2).contiguous()
  tokens = torch.from_numpy(np.load(job["tokens"]).astype(np.int64))
  out = {f"state/{k}": v.detach().numpy() for k, v in model.state_dict().items()}
  with torch.no_grad():
    out["image_embedding"] = model.encode_image(images).numpy()
    out["text_embedding"] = model.encode_text(tokens).numpy()
    out["image_normalized"] = model.encode_image(images, normalize=True).numpy()
    out["text_normalized"] = model.encode_text(tokens, normalize=True).numpy()
  out["num_params"] = np.array(sum(p.numel() for p in model.parameters()))
  np.savez(job["out"], **out)


if __name__ == "__main__":
  torch.set_num_threads(2)
  for job in json.load(open(sys.argv[1])):
    if job.get("kind") == "timm":
      timm_ref.run(job)
    else:
      run(job)
