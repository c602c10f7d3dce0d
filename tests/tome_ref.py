"""ToMe, EViT and DynamicViT re-created in PyTorch on timm's ViT, for
``test_token_reduction.py``.

Written from the papers' algorithms (ToMe: Bolya et al., 2023, bipartite soft matching
on the keys averaged over heads, size-weighted merging, proportional attention; EViT:
Liang et al., 2022, top-k by the class token's attention averaged over heads, the rest
fused into one token weighted by that attention; DynamicViT: Rao et al., 2021, the
PredictorLG module and the inference rule of its DynamicViT code, keep the
``int(rho**s * n)`` tokens of highest keep score before the ``s``-th pruning block).
The matching, the merges and the top-k run
one image and one token at a time, in plain Python loops: an independent check of
the vectorised gathers and scatters in ``vit_jax.models.token_reduction``. The block
is timm's, re-run step by step (its ``qkv``, ``proj``, norms, layer scales, MLP).

  python tests/tome_ref.py jobs.json

A job is a ``timm_ref.py`` job (``model``, ``kwargs``, ``input``, ``out``, ``seed``,
``randomize``) plus ``num_prefix_tokens`` and either ``token_merging`` (a list, ``r``
per block), ``token_keep_rate`` with ``token_keep_layers``, or ``token_pruning`` with
``token_pruning_layers``. The ``.npz`` holds ``state/<name>``, ``logits``,
``features`` (the head's input), ``tokens/<i>`` (block ``i``'s output tokens) and, for
DynamicViT, ``predictor/<s>/<name>`` (the randomly initialised predictors' weights).
"""

import json
import math
import sys

import numpy as np
import timm
import torch

from torch_random import randomize


def attention(attn, x, size):
  """timm's attention with proportional attention; also the keys and the weights."""
  batch, tokens, dim = x.shape
  qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, dim // attn.num_heads)
  q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, heads, N, head_dim]
  q, k = attn.q_norm(q), attn.k_norm(k)
  logits = (q * attn.scale) @ k.transpose(-2, -1)
  if size is not None:
    logits = logits + size.log()[:, None, None, :]
  weights = logits.softmax(dim=-1)
  out = (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)
  return attn.proj(attn.norm(out)), k, weights


def tome_image(x, size, keys, r, prefix):
  """One image's ToMe step: ``x`` [N, C], ``size`` [N], ``keys`` [N, d] (head mean)."""
  n = x.shape[0]
  r = min(r, (n - prefix) // 2)
  if r <= 0:
    return x, size
  unit = keys / keys.norm(dim=-1, keepdim=True)
  set_a, set_b = list(range(0, n, 2)), list(range(1, n, 2))
  targets = [j for j in set_b if j >= prefix]  # the distillation token takes nothing
  match = {}
  for i in set_a:
    if i >= prefix:  # the class token is never merged
      sims = [float(unit[i] @ unit[j]) for j in targets]
      best = max(range(len(sims)), key=lambda t: sims[t])
      match[i] = (sims[best], targets[best])
  merged = set(sorted(match, key=lambda i: -match[i][0])[:r])
  total = {j: x[j] * size[j] for j in set_b}
  weight = {j: size[j].clone() for j in set_b}
  for i in merged:
    total[match[i][1]] = total[match[i][1]] + x[i] * size[i]
    weight[match[i][1]] = weight[match[i][1]] + size[i]
  kept = [("a", i) for i in set_a if i not in merged]
  dst = [("b", j) for j in set_b]
  order = kept[:1] + dst[:1] + kept[1:] + dst[1:] if prefix == 2 else kept + dst
  rows = [x[i] if s == "a" else total[i] / weight[i] for s, i in order]
  sizes = [size[i] if s == "a" else weight[i] for s, i in order]
  return torch.stack(rows), torch.stack(sizes)


def evit_image(x, cls_attention, keep_rate, prefix):
  """One image's EViT step: keep the top tokens (published order), fuse the rest."""
  n = x.shape[0] - prefix
  keep = math.ceil(keep_rate * n)
  if keep >= n:
    return x
  top = torch.topk(cls_attention, keep, largest=True, sorted=True).indices.tolist()
  rest = [t for t in range(n) if t not in set(top)]
  patches = x[prefix:]
  fused = sum(patches[t] * cls_attention[t] for t in rest)
  return torch.cat([x[:prefix], patches[top], fused[None]])


class PredictorLG(torch.nn.Module):
  """DynamicViT's prediction module, as published (local and global halves)."""

  def __init__(self, dim):
    super().__init__()
    nn = torch.nn
    self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
    self.out_conv = nn.Sequential(
        nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
        nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))

  def forward(self, x, policy):
    x = self.in_conv(x)
    batch, tokens, dim = x.size()
    local_x = x[:, :, :dim // 2]
    global_x = (x[:, :, dim // 2:] * policy).sum(dim=1, keepdim=True) / torch.sum(
        policy, dim=1, keepdim=True)
    x = torch.cat([local_x, global_x.expand(batch, tokens, dim // 2)], dim=-1)
    return self.out_conv(x)


def dynamic_image(x, scores, keep, prefix):
  """One image's DynamicViT inference step: the ``keep`` best patches, by score."""
  patches = x[prefix:]
  top = sorted(range(patches.shape[0]), key=lambda t: -float(scores[t]))[:keep]
  return torch.cat([x[:prefix], patches[top]])


def run(job):
  torch.manual_seed(job.get("seed", 0))
  model = timm.create_model(job["model"], pretrained=False, **job.get("kwargs", {}))
  randomize(model, job["randomize"], torch.Generator().manual_seed(job.get("seed", 0)))
  model.eval()
  prefix = job["num_prefix_tokens"]
  merging = job.get("token_merging") or [0] * len(model.blocks)
  keep_layers = job.get("token_keep_layers") or []
  images = torch.from_numpy(np.load(job["input"])).permute(0, 3, 1, 2).contiguous()
  out = {f"state/{k}": v.detach().numpy() for k, v in model.state_dict().items()}
  pruning_layers = job.get("token_pruning_layers") or []
  predictors = [PredictorLG(model.embed_dim) for _ in pruning_layers]
  for s, predictor in enumerate(predictors):
    out.update({f"predictor/{s}/{k}": v.detach().numpy()
                for k, v in predictor.state_dict().items()})
  with torch.no_grad():
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    size = torch.ones(x.shape[:2])
    init_n = x.shape[1] - prefix
    for i, block in enumerate(model.blocks):
      if i in pruning_layers:
        s = pruning_layers.index(i)
        keep = int(init_n * job["token_pruning"] ** (s + 1))
        decision = torch.ones(x.shape[0], x.shape[1] - prefix, 1)  # all live at inference
        scores = predictors[s](x[:, prefix:], decision)[:, :, 0]
        x = torch.stack([dynamic_image(x[b], scores[b], keep, prefix)
                         for b in range(x.shape[0])])
      y, keys, weights = attention(block.attn, block.norm1(x),
                                   size if any(merging) else None)
      x = x + block.ls1(y)
      if merging[i]:
        steps = [tome_image(x[b], size[b], keys[b].mean(0), merging[i], prefix)
                 for b in range(x.shape[0])]
        x, size = torch.stack([s[0] for s in steps]), torch.stack([s[1] for s in steps])
      elif i in keep_layers:
        cls_attention = weights[:, :, 0, prefix:].mean(1)
        x = torch.stack([evit_image(x[b], cls_attention[b], job["token_keep_rate"], prefix)
                         for b in range(x.shape[0])])
      x = x + block.ls2(block.mlp(block.norm2(x)))
      out[f"tokens/{i}"] = x.numpy()
    x = model.norm(x)
    out["features"] = model.forward_head(x, pre_logits=True).numpy()
    out["logits"] = model.forward_head(x).numpy()
  np.savez(job["out"], **out)


if __name__ == "__main__":
  torch.set_num_threads(2)
  for job in json.load(open(sys.argv[1])):
    run(job)
