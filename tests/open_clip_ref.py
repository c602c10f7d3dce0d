"""Runs open_clip models with random weights; writes state dicts and embeddings to .npz.

PyTorch and TensorFlow abort when imported into one process, so tests run this file
as a subprocess (``helpers.run_open_clip_reference``)::

  python tests/open_clip_ref.py jobs.json

Each job: ``{"model": open_clip name, "images": "x.npy" (NHWC float32), "tokens":
"t.npy" (int), "out": "y.npz", "seed": 0, "randomize": 0.02 or null}``; a job with
``"kind": "timm"`` is handed to ``timm_ref.run`` instead (one torch start-up for both).
The ``.npz`` holds ``state/<name>`` for every state-dict entry, ``image_embedding`` and
``text_embedding`` (``encode_image``/``encode_text`` without normalisation),
``image_normalized``, ``text_normalized`` and ``num_params``. Optional ``"kwargs"``
go to ``open_clip.create_model`` (e.g. ``vision_cfg`` with fewer layers).

A job with ``"transform"`` runs an eval transform on the PNG ``"image"`` and writes
``output`` (HWC, normalised): ``{"timm": "name.tag"}`` is timm's ``create_transform``
for that pretrained config, ``{"open_clip": [model, tag]}`` open_clip's
``image_transform`` for that pretrained config.
"""

import json
import os
import sys

import numpy as np
import open_clip
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timm_ref  # noqa: E402  pylint: disable=g-import-not-at-top


def run_transform(job: dict) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  spec = job["transform"]
  if "timm" in spec:
    import timm  # pylint: disable=g-import-not-at-top
    from timm import data  # pylint: disable=g-import-not-at-top
    cfg = timm.models.get_pretrained_cfg(spec["timm"]).to_dict()
    transform = data.create_transform(**data.resolve_data_config({}, pretrained_cfg=cfg))
  else:
    cfg = open_clip.get_pretrained_cfg(*spec["open_clip"])
    size = open_clip.get_model_config(spec["open_clip"][0])["vision_cfg"]["image_size"]
    transform = open_clip.image_transform(
        size, is_train=False, mean=cfg["mean"], std=cfg["std"],
        resize_mode=cfg["resize_mode"], interpolation=cfg["interpolation"])
  with Image.open(job["image"]) as image:
    np.savez(job["out"], output=transform(image.convert("RGB")).permute(1, 2, 0).numpy())


def run(job: dict) -> None:
  if "transform" in job:
    run_transform(job)
    return
  torch.manual_seed(job.get("seed", 0))
  model = open_clip.create_model(job["model"], pretrained=None, device="cpu",
                                 precision="fp32", **job.get("kwargs", {}))
  if job.get("randomize"):
    # open_clip zero-initialises biases and sets norms to 1/0, which would let a
    # converter that confuses those tensors pass.
    timm_ref.randomize(model, job["randomize"],
                       torch.Generator().manual_seed(job.get("seed", 0)))
    with torch.no_grad():
      model.logit_scale.fill_(np.log(1 / 0.07))
  model.eval()
  images = np.load(job.get("images") or job["input"])  # helpers.run_timm_reference: input
  images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
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
