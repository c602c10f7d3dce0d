"""A PyTorch re-creation of whai362/PVT's ``classification/pvt.py`` (PVT v1).

Written from the official code for the parity tests (run through ``official_ref.py`` in a
subprocess): the same modules, state-dict names, float32 arithmetic and eval-mode
forward as ``PyramidVisionTransformer``, including its position-embedding resize (bilinear,
``align_corners=False``, skipped whenever a stage's token count equals stage 1's).
Weight initialisation, dropout and stochastic depth are left out (the tests fill every
parameter with noise and run in eval mode).

``build(**config)`` takes ``PyramidVisionTransformer``'s arguments (plus ``norm_eps``,
the blocks' LayerNorm epsilon, which the registered models set to 1e-6);
``forward(model, images)`` returns ``(logits, features, [stage maps, NHWC])`` with the
features the normalised class token and the last map without the class token.
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


class Attention(nn.Module):
  """Spatial-reduction attention: keys and values from an ``sr x sr`` strided conv."""

  def __init__(self, dim, num_heads, qkv_bias, sr_ratio):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.q = nn.Linear(dim, dim, bias=qkv_bias)
    self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
    self.proj = nn.Linear(dim, dim)
    self.sr_ratio = sr_ratio
    if sr_ratio > 1:
      self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
      self.norm = nn.LayerNorm(dim)

  def forward(self, x, h, w):
    b, n, c = x.shape
    heads = lambda t: t.reshape(b, -1, self.num_heads, c // self.num_heads).transpose(1, 2)
    q = heads(self.q(x))
    if self.sr_ratio > 1:
      x = self.sr(x.transpose(1, 2).reshape(b, c, h, w)).reshape(b, c, -1).transpose(1, 2)
      x = self.norm(x)
    k, v = (heads(t) for t in self.kv(x).chunk(2, dim=-1))
    attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):

  def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, sr_ratio, norm_eps):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
    self.attn = Attention(dim, num_heads, qkv_bias, sr_ratio)
    self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x, h, w):
    x = x + self.attn(self.norm1(x), h, w)
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):

  def __init__(self, img_size, patch_size, in_chans, embed_dim):
    super().__init__()
    self.patch_size = patch_size
    self.H, self.W = img_size // patch_size, img_size // patch_size  # pylint: disable=invalid-name
    self.num_patches = self.H * self.W
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
    self.norm = nn.LayerNorm(embed_dim)

  def forward(self, x):
    h, w = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
    return self.norm(self.proj(x).flatten(2).transpose(1, 2)), (h, w)


class PyramidVisionTransformer(nn.Module):

  def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000,
               embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8),
               mlp_ratios=(8, 8, 4, 4), qkv_bias=True, depths=(2, 2, 2, 2),
               sr_ratios=(8, 4, 2, 1), norm_eps=1e-6):
    super().__init__()
    self.num_stages = len(depths)
    for i in range(self.num_stages):
      embed = PatchEmbed(img_size if i == 0 else img_size // 2 ** (i + 1),
                         patch_size if i == 0 else 2,
                         in_chans if i == 0 else embed_dims[i - 1], embed_dims[i])
      extra = int(i == self.num_stages - 1)  # the class token's slot
      setattr(self, f"patch_embed{i + 1}", embed)
      setattr(self, f"pos_embed{i + 1}",
              nn.Parameter(torch.zeros(1, embed.num_patches + extra, embed_dims[i])))
      setattr(self, f"block{i + 1}", nn.ModuleList([
          Block(embed_dims[i], num_heads[i], mlp_ratios[i], qkv_bias, sr_ratios[i],
                norm_eps) for _ in range(depths[i])]))
    self.norm = nn.LayerNorm(embed_dims[-1], eps=norm_eps)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1]))
    self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()

  def _get_pos_embed(self, pos_embed, embed, h, w):
    # The official test is against stage 1's token count, for every stage.
    if h * w == self.patch_embed1.num_patches:
      return pos_embed
    grid = pos_embed.reshape(1, embed.H, embed.W, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
    return grid.reshape(1, -1, h * w).permute(0, 2, 1)

  def forward_stages(self, x):
    b = x.shape[0]
    stages = []
    for i in range(self.num_stages):
      embed = getattr(self, f"patch_embed{i + 1}")
      pos_embed = getattr(self, f"pos_embed{i + 1}")
      x, (h, w) = embed(x)
      if i == self.num_stages - 1:
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        pos_embed = torch.cat(
            (pos_embed[:, :1], self._get_pos_embed(pos_embed[:, 1:], embed, h, w)), dim=1)
      else:
        pos_embed = self._get_pos_embed(pos_embed, embed, h, w)
      x = x + pos_embed
      for block in getattr(self, f"block{i + 1}"):
        x = block(x, h, w)
      tokens = x[:, 1:] if i == self.num_stages - 1 else x
      stages.append(tokens.reshape(b, h, w, -1))
      if i != self.num_stages - 1:
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
    features = self.norm(x)[:, 0]
    return self.head(features), features, stages


def build(**config) -> nn.Module:
  return PyramidVisionTransformer(**config)


def forward(model, images):
  return model.forward_stages(images)


# The official registered configurations (for parameter counts).
CONFIGS = {name: dict(patch_size=4, embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8],
                      mlp_ratios=[8, 8, 4, 4], qkv_bias=True, depths=depths,
                      sr_ratios=[8, 4, 2, 1])
           for name, depths in (("pvt_tiny", [2, 2, 2, 2]), ("pvt_small", [3, 4, 6, 3]),
                                ("pvt_medium", [3, 4, 18, 3]),
                                ("pvt_large", [3, 8, 27, 3]))}
