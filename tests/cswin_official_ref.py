"""A PyTorch re-creation of microsoft/CSWin-Transformer's ``models/cswin.py``.

Written from the official code for the parity tests (run through ``official_ref.py`` in a
subprocess): the same modules, state-dict names, float32 arithmetic and eval-mode
forward as ``CSWinTransformer``, including its square maps of the construction size
and its rule that a block whose map side equals its stripe width attends globally
with one branch. Weight initialisation, dropout, stochastic depth and checkpointing
are left out (the tests fill every parameter with noise and run in eval mode).

``build(**config)`` takes ``CSWinTransformer``'s arguments; ``forward(model, images)``
returns ``(logits, features, [stage maps, NHWC])``, the maps being each stage's
output before the next merge (the last one before the final norm).
"""

import torch
from torch import nn
import torch.nn.functional as F


class Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


def to_windows(x, h_sp, w_sp):
  """``(B, C, H, W)`` -> ``(B * windows, C, h_sp, w_sp)``, windows in raster order."""
  b, c, h, w = x.shape
  x = x.view(b, c, h // h_sp, h_sp, w // w_sp, w_sp)
  return x.permute(0, 2, 4, 1, 3, 5).contiguous().reshape(-1, c, h_sp, w_sp)


def from_windows(x, h_sp, w_sp, h, w):
  """``(B * windows, h_sp * w_sp, C)`` -> ``(B, H * W, C)``."""
  b = x.shape[0] // ((h // h_sp) * (w // w_sp))
  x = x.view(b, h // h_sp, w // w_sp, h_sp, w_sp, -1)
  return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h * w, -1)


class LePEAttention(nn.Module):
  """Attention inside stripes (idx 0: vertical, 1: horizontal, -1: whole map) + LePE."""

  def __init__(self, dim, resolution, idx, split_size, num_heads):
    super().__init__()
    self.resolution, self.num_heads = resolution, num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.h_sp, self.w_sp = {-1: (resolution, resolution), 0: (resolution, split_size),
                            1: (split_size, resolution)}[idx]
    self.get_v = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

  def windows(self, t):
    """``(B, L, C)`` tokens -> ``(B', heads, h_sp * w_sp, head_dim)``.

    In the official order of permutes and copies: with one head, the strides of the
    size-1 axis differ otherwise, and the matmuls then round differently.
    """
    b, _, c = t.shape
    t = t.transpose(1, 2).contiguous().view(b, c, self.resolution, self.resolution)
    t = t.view(b, c, self.resolution // self.h_sp, self.h_sp,
               self.resolution // self.w_sp, self.w_sp)
    t = t.permute(0, 2, 4, 3, 5, 1).contiguous().reshape(-1, self.h_sp * self.w_sp, c)
    return t.reshape(-1, self.h_sp * self.w_sp, self.num_heads,
                     c // self.num_heads).permute(0, 2, 1, 3).contiguous()

  def forward(self, q, k, v):
    b, _, c = q.shape
    v = to_windows(v.transpose(1, 2).reshape(b, c, self.resolution, self.resolution),
                   self.h_sp, self.w_sp)  # (B', C, h_sp, w_sp)
    heads = lambda t: t.reshape(-1, self.num_heads, c // self.num_heads,
                                self.h_sp * self.w_sp).permute(0, 1, 3, 2).contiguous()
    lepe, v = heads(self.get_v(v)), heads(v)
    q, k = self.windows(q) * self.scale, self.windows(k)
    attn = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
    x = (attn @ v + lepe).transpose(1, 2).reshape(-1, self.h_sp * self.w_sp, c)
    return from_windows(x, self.h_sp, self.w_sp, self.resolution, self.resolution)


class CSWinBlock(nn.Module):

  def __init__(self, dim, reso, num_heads, split_size, mlp_ratio, qkv_bias, last_stage):
    super().__init__()
    self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
    self.norm1 = nn.LayerNorm(dim)
    self.branch_num = 1 if (last_stage or reso == split_size) else 2
    self.proj = nn.Linear(dim, dim)
    if self.branch_num == 1:
      self.attns = nn.ModuleList([LePEAttention(dim, reso, -1, split_size, num_heads)])
    else:
      self.attns = nn.ModuleList([LePEAttention(dim // 2, reso, i, split_size,
                                                num_heads // 2) for i in range(2)])
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.norm2 = nn.LayerNorm(dim)

  def forward(self, x):
    c = x.shape[-1]
    q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
    if self.branch_num == 2:
      half = c // 2
      out = torch.cat([attn(q[..., s], k[..., s], v[..., s]) for attn, s in
                       zip(self.attns, (slice(0, half), slice(half, c)))], dim=2)
    else:
      out = self.attns[0](q, k, v)
    x = x + self.proj(out)
    return x + self.mlp(self.norm2(x))


class MergeBlock(nn.Module):

  def __init__(self, dim, dim_out):
    super().__init__()
    self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1)
    self.norm = nn.LayerNorm(dim_out)

  def forward(self, x, side):
    b, _, c = x.shape
    x = self.conv(x.transpose(1, 2).contiguous().view(b, c, side, side))
    return self.norm(x.flatten(2).transpose(1, 2).contiguous())


class TokensLast(nn.Module):
  """``(B, C, H, W)`` -> ``(B, H * W, C)``: the official ``Rearrange`` (no parameters)."""

  def forward(self, x):
    return x.flatten(2).transpose(1, 2)


class CSWinTransformer(nn.Module):

  def __init__(self, img_size=224, in_chans=3, num_classes=1000, embed_dim=64,
               depth=(1, 2, 21, 1), split_size=(1, 2, 7, 7), num_heads=(2, 4, 8, 16),
               mlp_ratio=4.0, qkv_bias=True):
    super().__init__()
    self.stage1_conv_embed = nn.Sequential(nn.Conv2d(in_chans, embed_dim, 7, 4, 2),
                                           TokensLast(), nn.LayerNorm(embed_dim))
    self.sides = [img_size // 4 // 2 ** i for i in range(4)]
    dim = embed_dim
    for i in range(4):
      if i:
        setattr(self, f"merge{i}", MergeBlock(dim, dim * 2))
        dim *= 2
      setattr(self, f"stage{i + 1}", nn.ModuleList([
          CSWinBlock(dim, self.sides[i], num_heads[i], split_size[i], mlp_ratio, qkv_bias,
                     last_stage=i == 3) for _ in range(depth[i])]))
    self.norm = nn.LayerNorm(dim)
    self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

  def forward_stages(self, x):
    b = x.shape[0]
    x = self.stage1_conv_embed(x)
    stages = []
    for i in range(4):
      if i:
        x = getattr(self, f"merge{i}")(x, self.sides[i - 1])
      for block in getattr(self, f"stage{i + 1}"):
        x = block(x)
      stages.append(x.reshape(b, self.sides[i], self.sides[i], -1))
    features = self.norm(x).mean(dim=1)
    return self.head(features), features, stages


def build(**config) -> nn.Module:
  return CSWinTransformer(**config)


def forward(model, images):
  return model.forward_stages(images)


# The official registered configurations (for parameter counts).
_SMALL_DEPTHS = [2, 4, 32, 2]
CONFIGS = {
    "cswin_tiny_224": dict(embed_dim=64, depth=[1, 2, 21, 1], split_size=[1, 2, 7, 7],
                           num_heads=[2, 4, 8, 16]),
    "cswin_small_224": dict(embed_dim=64, depth=_SMALL_DEPTHS, split_size=[1, 2, 7, 7],
                            num_heads=[2, 4, 8, 16]),
    "cswin_base_224": dict(embed_dim=96, depth=_SMALL_DEPTHS, split_size=[1, 2, 7, 7],
                           num_heads=[4, 8, 16, 32]),
    "cswin_large_224": dict(embed_dim=144, depth=_SMALL_DEPTHS, split_size=[1, 2, 7, 7],
                            num_heads=[6, 12, 24, 24]),
    "cswin_base_384": dict(img_size=384, embed_dim=96, depth=_SMALL_DEPTHS,
                           split_size=[1, 2, 12, 12], num_heads=[4, 8, 16, 32]),
    "cswin_large_384": dict(img_size=384, embed_dim=144, depth=_SMALL_DEPTHS,
                            split_size=[1, 2, 12, 12], num_heads=[6, 12, 24, 24]),
}
