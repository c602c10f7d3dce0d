"""A PyTorch re-creation of hustvl/ViG's ``HierViG`` (``classification/models/vig_h.py``).

Written from the official code for the parity tests (run through ``official_ref.py``
in a subprocess): same module tree and parameter names, the evaluation-mode forward
of the configuration the released models use (``norm_layer="ln2d"``, so every module
runs channel-first; ``patchembed_version="v2"``, ``downsample_version="v3"``,
``gmlp=True``, ``rope_mode="none"``, no SiLU in the conv or before ``o_proj``). The
official GLA2D calls flash-linear-attention's Triton kernel ``bid_fused_recurrent_gla``
(the repository's fork: forward and reverse recurrences, ``o.sum(0) / 2``); here it is
the documented naive recurrence (``fla/ops/gla/naive.py``) in each direction, summed
and halved. Unlike the plain ViG, the hierarchical GLA does not halve it again (its
``o /= 2`` is commented out). ``Linear2d`` is a 1x1 conv with a Linear's ``[out, in]``
weight; ``gMlp``'s width is ``2/3 * 4 * d`` rounded up to 32, ``swiglu(a, b) =
silu(a) * b``.
"""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from vig_official_ref import LayerNorm2d, RMSNorm, naive_recurrent_gla


class Linear2d(nn.Linear):

  def forward(self, x):
    return F.conv2d(x, self.weight[:, :, None, None], self.bias)


class GLA2D(nn.Module):
  """Channel-first GLA2D, eval branch (``mode`` only picks a kernel in training)."""

  def __init__(self, d_model, num_heads, expand_k=0.5, expand_v=1.0, layernorm_eps=1e-6,
               gate_logit_normalizer=16, gate_low_rank_dim=16):
    super().__init__()
    self.num_heads = num_heads
    self.key_dim, self.value_dim = int(d_model * expand_k), int(d_model * expand_v)
    self.head_v_dim = self.value_dim // num_heads
    self.gate_logit_normalizer = gate_logit_normalizer
    self.in_proj = nn.Sequential(
        nn.Conv2d(d_model, d_model, kernel_size=3, padding=1, groups=d_model, bias=False),
        nn.Identity())  # use_act_in_conv=False
    self.qkv_proj = Linear2d(d_model, 2 * self.key_dim + self.value_dim, bias=False)
    self.gk_proj = nn.Sequential(Linear2d(d_model, gate_low_rank_dim, bias=False),
                                 Linear2d(gate_low_rank_dim, self.key_dim * 2, bias=True))
    self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)
    self.g_norm = RMSNorm(self.head_v_dim, eps=layernorm_eps)
    self.l_norm = RMSNorm(self.head_v_dim, eps=layernorm_eps)
    self.g_proj = Linear2d(d_model, self.value_dim, bias=True)

  def forward(self, x):
    batch, _, height, width = x.shape
    local_out = self.in_proj(x)
    xs = local_out
    q, k, v = torch.split(self.qkv_proj(xs).flatten(-2),
                          [self.key_dim, self.key_dim, self.value_dim], dim=1)
    fw_gk, bw_gk = self.gk_proj(xs).flatten(-2).chunk(2, dim=1)
    heads = lambda t: t.reshape(batch, self.num_heads, -1, t.shape[-1]).transpose(2, 3)
    q, k, v = heads(q), heads(k), heads(v)  # 'b (h d) n -> b h n d'
    fw_gk = F.logsigmoid(heads(fw_gk)) / self.gate_logit_normalizer
    bw_gk = F.logsigmoid(heads(bw_gk)) / self.gate_logit_normalizer
    # bid_fused_recurrent_gla: forward + reverse, summed and halved.
    o = (naive_recurrent_gla(q, k, v, fw_gk)
         + naive_recurrent_gla(q, k, v, bw_gk, reverse=True)) / 2
    o = o.transpose(1, 2)  # 'b h l d -> b l h d'
    to_tokens = lambda t: t.reshape(batch, self.num_heads, self.head_v_dim, -1).permute(
        0, 3, 1, 2)  # 'b (h d) ih iw -> b (ih iw) h d'
    g = to_tokens(self.g_proj(xs).sigmoid())
    o = self.g_norm(o)
    local_out = self.l_norm(to_tokens(local_out))
    o = (o * g + local_out * (1 - g)).flatten(2)
    o = self.o_proj(o)
    return o.permute(0, 2, 1).reshape(batch, -1, height, width)


class gMlp(nn.Module):  # pylint: disable=invalid-name

  def __init__(self, in_features):
    super().__init__()
    intermediate = int(in_features * 4 * 2 / 3)
    intermediate = 32 * ((intermediate + 31) // 32)
    self.fc1 = Linear2d(in_features, 2 * intermediate, bias=False)
    self.fc2 = Linear2d(intermediate, in_features, bias=False)
    self.drop = nn.Dropout(0.0)

  def forward(self, x):
    gate, y = self.fc1(x).chunk(2, dim=1)
    return self.drop(self.fc2(F.silu(gate) * y))


class VSSBlock(nn.Module):

  def __init__(self, hidden_dim, num_head, eps=1e-6):
    super().__init__()
    self.norm = LayerNorm2d(hidden_dim)
    self.op = GLA2D(hidden_dim, num_head, layernorm_eps=eps)
    self.drop_path = nn.Identity()
    self.norm2 = LayerNorm2d(hidden_dim)
    self.mlp = gMlp(hidden_dim)

  def forward(self, x):
    x = x + self.drop_path(self.op(self.norm(x)))
    return x + self.drop_path(self.mlp(self.norm2(x)))


class HierViG(nn.Module):

  def __init__(self, patch_size=4, in_chans=3, num_classes=1000, depths=(2, 2, 9, 2),
               dims=96, num_heads=(3, 6, 12, 24)):
    super().__init__()
    if isinstance(dims, int):
      dims = [int(dims * 2 ** i) for i in range(len(depths))]
    self.dims = dims
    stride = patch_size // 2
    self.patch_embed = nn.Sequential(
        nn.Conv2d(in_chans, dims[0] // 2, kernel_size=stride + 1, stride=stride, padding=1),
        nn.Identity(), LayerNorm2d(dims[0] // 2), nn.Identity(), nn.GELU(),
        nn.Conv2d(dims[0] // 2, dims[0], kernel_size=stride + 1, stride=stride, padding=1),
        nn.Identity(), LayerNorm2d(dims[0]))
    self.layers = nn.ModuleList()
    for i, depth in enumerate(depths):
      downsample = nn.Sequential(
          nn.Identity(), nn.Conv2d(dims[i], dims[i + 1], kernel_size=3, stride=2, padding=1),
          nn.Identity(), LayerNorm2d(dims[i + 1])) if i < len(depths) - 1 else nn.Identity()
      self.layers.append(nn.Sequential(OrderedDict(
          blocks=nn.Sequential(*[VSSBlock(dims[i], num_heads[i]) for _ in range(depth)]),
          downsample=downsample)))
    self.classifier = nn.Sequential(OrderedDict(
        norm=LayerNorm2d(dims[-1]), permute=nn.Identity(), avgpool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(1), head=nn.Linear(dims[-1], num_classes)))

  def forward_intermediates(self, x):
    """Logits, the pooled features and each stage's blocks' output (``[B, C, h, w]``)."""
    x = self.patch_embed(x)
    maps = []
    for layer in self.layers:
      x = layer.blocks(x)
      maps.append(x)
      x = layer.downsample(x)
    c = self.classifier
    features = c.flatten(c.avgpool(c.permute(c.norm(x))))
    return c.head(features), features, maps


# The released configurations (classification/configs/vig-h/vig-h-{t,s,b}.yaml).
CONFIGS = {
    "vig_h_tiny": dict(dims=96, depths=(2, 2, 5, 2), num_heads=(3, 6, 12, 24)),
    "vig_h_small": dict(dims=96, depths=(2, 2, 17, 2), num_heads=(3, 6, 12, 24)),
    "vig_h_base": dict(dims=128, depths=(2, 2, 17, 2), num_heads=(4, 8, 16, 32)),
}


def build(name=None, **config) -> nn.Module:
  """``HierViG(**config)``, on the released configuration ``name`` if given."""
  return HierViG(**{**CONFIGS.get(name, {}), **config})


def forward(model, images):
  """Logits, features and the stage maps as NHWC (``official_ref.py``'s ``stage/i``)."""
  logits, features, maps = model.forward_intermediates(images)
  return logits, features, [m.permute(0, 2, 3, 1) for m in maps]
