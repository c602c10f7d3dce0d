"""A PyTorch re-creation of hustvl/ViG's ``ViG`` (``classification/models/vig.py``).

Written from the official code for the parity tests (run through ``official_ref.py``
in a subprocess): same module tree and parameter names, the evaluation-mode forward.
The official GLA calls flash-linear-attention's Triton kernel
``bid_fused_recurrent_gla``; here it is that kernel's documented naive formula
(``fla/ops/gla/naive.py``: ``naive_recurrent_gla``), a Python loop over the tokens in
each direction, summed and halved as the kernel does (the model halves it again).
Only the configuration the released models use is re-created: no class token,
average pooling, ``V2PatchEmbed``, SwiGLU MLPs, no RoPE, no layer scale.
"""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
  """fla's RMSNorm (``rms_norm_ref``): weight, no bias."""

  def __init__(self, hidden_size, eps=1e-6):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(hidden_size))

  def forward(self, x):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.weight


class LayerNorm2d(nn.LayerNorm):

  def forward(self, x):
    x = x.permute(0, 2, 3, 1)
    x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    return x.permute(0, 3, 1, 2)


class V2PatchEmbed(nn.Module):

  def __init__(self, patch_size=16, in_chans=3, embed_dim=192):
    super().__init__()
    stride = patch_size // 2
    self.proj = nn.Sequential(
        nn.Conv2d(in_chans, embed_dim // 2, kernel_size=stride + 1, stride=stride, padding=1),
        LayerNorm2d(embed_dim // 2), nn.SiLU(),
        nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
        LayerNorm2d(embed_dim))

  def forward(self, x):
    x = self.proj(x)
    return x.flatten(2).transpose(1, 2), x.shape[2:]


def naive_recurrent_gla(q, k, v, gk, reverse=False):
  """fla's naive GLA recurrence on ``[B, H, L, D]``; q is scaled by ``D^-0.5``."""
  batch, heads, length, dk = q.shape
  h = torch.zeros(batch, heads, dk, v.shape[-1], dtype=torch.float32)
  out = torch.zeros_like(v)
  order = range(length - 1, -1, -1) if reverse else range(length)
  for i in order:
    h = h * gk[:, :, i].exp()[..., None] + k[:, :, i, :, None] * v[:, :, i, None, :]
    out[:, :, i] = ((q[:, :, i] * dk ** -0.5)[..., None] * h).sum(-2)
  return out


class GatedLinearAttention(nn.Module):

  def __init__(self, d_model, num_heads, expand_k=0.5, expand_v=1.0, use_out_act=False,
               use_act_in_conv=True, eps=1e-6, gate_low_rank_dim=16,
               gate_logit_normalizer=16):
    super().__init__()
    self.num_heads = num_heads
    self.key_dim, self.value_dim = int(d_model * expand_k), int(d_model * expand_v)
    self.head_v_dim = self.value_dim // num_heads
    self.gate_logit_normalizer = gate_logit_normalizer
    self.in_proj = nn.Sequential(
        nn.Conv2d(d_model, d_model, 3, padding=1, groups=d_model, bias=False),
        nn.SiLU() if use_act_in_conv else nn.Identity())
    self.qkv_proj = nn.Linear(d_model, 2 * self.key_dim + self.value_dim, bias=False)
    self.gk_proj = nn.Sequential(nn.Linear(d_model, gate_low_rank_dim, bias=False),
                                 nn.Linear(gate_low_rank_dim, self.key_dim * 2, bias=True))
    self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)
    self.g_norm = RMSNorm(self.head_v_dim, eps=eps)
    self.l_norm = RMSNorm(self.head_v_dim, eps=eps)
    self.g_proj = nn.Linear(d_model, self.value_dim, bias=True)
    self.out_act = nn.SiLU() if use_out_act else None

  def forward(self, x, patch_resolution):
    batch, length, channels = x.shape
    h, w = patch_resolution
    x_2d = x.transpose(1, 2).reshape(batch, channels, h, w)
    local_out = self.in_proj(x_2d).flatten(2)  # [B, C, L]
    xs = local_out.permute(0, 2, 1)
    q, k, v = torch.split(self.qkv_proj(xs), [self.key_dim, self.key_dim, self.value_dim],
                          dim=2)
    fw_gk, bw_gk = self.gk_proj(xs).chunk(2, dim=2)
    heads = lambda t: t.reshape(batch, length, self.num_heads, -1).transpose(1, 2)
    q, k, v = heads(q), heads(k), heads(v)
    fw_gk = F.logsigmoid(heads(fw_gk)) / self.gate_logit_normalizer
    bw_gk = F.logsigmoid(heads(bw_gk)) / self.gate_logit_normalizer
    # bid_fused_recurrent_gla: forward + reverse, summed and halved; then o /= 2.
    o = (naive_recurrent_gla(q, k, v, fw_gk)
         + naive_recurrent_gla(q, k, v, bw_gk, reverse=True)) / 2
    o = (o / 2).transpose(1, 2)  # [B, L, H, D]
    local_out = local_out.reshape(batch, self.num_heads, self.head_v_dim, length)
    local_out = self.l_norm(local_out.permute(0, 3, 1, 2))
    o = self.g_norm(o)
    g = self.g_proj(xs).sigmoid().reshape(batch, length, self.num_heads, self.head_v_dim)
    o = (o * g + local_out * (1 - g)).reshape(batch, length, self.value_dim)
    if self.out_act is not None:
      o = self.out_act(o)
    return self.o_proj(o)


class GLAMLP(nn.Module):

  def __init__(self, hidden_size, hidden_ratio=4):
    super().__init__()
    intermediate = int(hidden_size * hidden_ratio * 2 / 3)
    intermediate = 256 * ((intermediate + 255) // 256)
    self.gate_proj = nn.Linear(hidden_size, intermediate * 2, bias=False)
    self.down_proj = nn.Linear(intermediate, hidden_size, bias=False)

  def forward(self, x):
    gate, y = self.gate_proj(x).chunk(2, -1)
    return self.down_proj(F.silu(gate) * y)


class GLABlock(nn.Module):

  def __init__(self, dim, num_heads, use_out_act, use_act_in_conv, eps=1e-6):
    super().__init__()
    self.attn_norm = RMSNorm(dim, eps=eps)
    self.attn = GatedLinearAttention(dim, num_heads, use_out_act=use_out_act,
                                     use_act_in_conv=use_act_in_conv, eps=eps)
    self.mlp_norm = RMSNorm(dim, eps=eps)
    self.mlp = GLAMLP(dim)

  def forward(self, x, patch_resolution):
    residual = x
    h = self.attn(self.attn_norm(x), patch_resolution)
    residual = h + residual  # the fused prenorm add: (norm(h + residual), h + residual)
    return residual + self.mlp(self.mlp_norm(residual))


class ViG(nn.Module):

  def __init__(self, img_size=224, patch_size=16, depth=12, embed_dim=192, num_heads=3,
               num_classes=1000, use_out_act=False, use_act_in_conv=True):
    super().__init__()
    self.patch_embed = V2PatchEmbed(patch_size, 3, embed_dim)
    side = img_size // patch_size
    self.pos_embed = nn.Parameter(torch.zeros(1, side * side, embed_dim))
    self.head = nn.Linear(embed_dim, num_classes)
    self.blocks = nn.ModuleList([GLABlock(embed_dim, num_heads, use_out_act, use_act_in_conv)
                                 for _ in range(depth)])
    self.norm = RMSNorm(embed_dim, eps=1e-6)

  def forward_intermediates(self, x):
    """Logits, the pooled features and every block's output (``[B, C, h, w]``)."""
    batch = x.shape[0]
    x, resolution = self.patch_embed(x)
    x = x + self.pos_embed
    maps = []
    for blk in self.blocks:
      x = blk(x, resolution)
      maps.append(x.transpose(1, 2).reshape(batch, -1, *resolution))
    features = self.norm(x).mean(1)
    return self.head(features), features, maps


# The released configurations (classification/configs/vig/vig-{t,s,b}.yaml).
CONFIGS = {
    "vig_tiny": dict(embed_dim=192, num_heads=3, use_out_act=True, use_act_in_conv=True),
    "vig_small": dict(embed_dim=384, num_heads=6, use_out_act=False, use_act_in_conv=False),
    "vig_base": dict(embed_dim=768, num_heads=12, use_out_act=False, use_act_in_conv=False),
}


def build(name=None, **config) -> nn.Module:
  """``ViG(**config)``, on the released configuration ``name`` if given."""
  return ViG(**{**CONFIGS.get(name, {}), **config})


def forward(model, images):
  """Logits, features and the block maps as NHWC (``official_ref.py``'s ``stage/i``)."""
  logits, features, maps = model.forward_intermediates(images)
  return logits, features, [m.permute(0, 2, 3, 1) for m in maps]
