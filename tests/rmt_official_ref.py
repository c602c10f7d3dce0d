"""A PyTorch re-creation of qhfan/RMT's ``classfication_release/RMT.py`` (``VisRetNet``).

Written from the official code for the parity tests (run through ``official_ref.py`` in a
subprocess): the same modules, parameter and buffer names, float32 arithmetic and forward
as the official model in eval mode, without its training-only pieces (checkpointing,
the custom swish autograd function, the unused recurrent branches). Stochastic depth
is left out: the tests run in eval mode.

``build(**config)`` takes ``VisRetNet``'s arguments; ``forward(model, images)`` returns
``(logits, features, [stage maps, NHWC])``, the stage maps being each layer's output
before its downsampling (what the official detection backbone returns).
"""

import torch
from torch import nn
import torch.nn.functional as F


class DWConv2d(nn.Module):
  """Depth-wise conv on ``(b, h, w, c)`` maps (parameters under ``.conv``)."""

  def __init__(self, dim, kernel_size, padding):
    super().__init__()
    self.conv = nn.Conv2d(dim, dim, kernel_size, 1, padding, groups=dim)

  def forward(self, x):
    return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class RetNetRelPos2d(nn.Module):
  """Buffers ``angle`` (rotary frequencies) and ``decay`` (log gamma per head)."""

  def __init__(self, embed_dim, num_heads, initial_value, heads_range):
    super().__init__()
    head_dim = embed_dim // num_heads
    angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 2))
    self.register_buffer("angle", angle.unsqueeze(-1).repeat(1, 2).flatten())
    heads = torch.arange(num_heads, dtype=torch.float)
    self.register_buffer("decay", torch.log(
        1 - 2 ** (-initial_value - heads_range * heads / num_heads)))

  def forward(self, h, w, decomposed):
    index = torch.arange(h * w).to(self.decay)
    phase = index[:, None] * self.angle[None, :]
    sin, cos = torch.sin(phase).reshape(h, w, -1), torch.cos(phase).reshape(h, w, -1)
    if decomposed:
      masks = []
      for n in (h, w):
        i = torch.arange(n).to(self.decay)
        masks.append((i[:, None] - i[None, :]).abs() * self.decay[:, None, None])
      return (sin, cos), tuple(masks)
    grid = torch.stack(torch.meshgrid(torch.arange(h).to(self.decay),
                                      torch.arange(w).to(self.decay), indexing="ij"),
                       dim=-1).reshape(h * w, 2)
    distance = (grid[:, None, :] - grid[None, :, :]).abs().sum(-1)
    return (sin, cos), distance * self.decay[:, None, None]


def rotate_every_two(x):
  x1, x2 = x[..., ::2], x[..., 1::2]
  return torch.stack([-x2, x1], dim=-1).flatten(-2)


def theta_shift(x, sin, cos):
  return x * cos + rotate_every_two(x) * sin


class VisionRetention(nn.Module):
  """``VisionRetentionChunk`` (decomposed) and ``VisionRetentionAll`` in one class."""

  def __init__(self, embed_dim, num_heads, decomposed):
    super().__init__()
    self.num_heads, self.decomposed = num_heads, decomposed
    self.key_dim = embed_dim // num_heads
    self.scaling = self.key_dim ** -0.5
    self.q_proj = nn.Linear(embed_dim, embed_dim)
    self.k_proj = nn.Linear(embed_dim, embed_dim)
    self.v_proj = nn.Linear(embed_dim, embed_dim)
    self.lepe = DWConv2d(embed_dim, 5, 2)
    self.out_proj = nn.Linear(embed_dim, embed_dim)

  def forward(self, x, rel_pos):
    b, h, w, _ = x.shape
    (sin, cos), mask = rel_pos
    q, k, v = self.q_proj(x), self.k_proj(x) * self.scaling, self.v_proj(x)
    lepe = self.lepe(v)
    split = lambda t: t.view(b, h, w, self.num_heads, -1).permute(0, 3, 1, 2, 4)
    qr, kr, vr = theta_shift(split(q), sin, cos), theta_shift(split(k), sin, cos), split(v)
    if self.decomposed:  # (b n h w d): along w inside each row, then along h
      mask_h, mask_w = mask
      qw, kw, vw = (t.transpose(1, 2) for t in (qr, kr, vr))  # (b h n w d)
      out = torch.softmax(qw @ kw.transpose(-1, -2) + mask_w, -1) @ vw
      qh, kh = (t.permute(0, 3, 1, 2, 4) for t in (qr, kr))  # (b w n h d)
      out = out.permute(0, 3, 2, 1, 4)
      out = torch.softmax(qh @ kh.transpose(-1, -2) + mask_h, -1) @ out  # (b w n h d)
      out = out.permute(0, 3, 1, 2, 4).flatten(-2)
    else:
      flat = lambda t: t.flatten(2, 3)  # (b n l d)
      out = torch.softmax(flat(qr) @ flat(kr).transpose(-1, -2) + mask, -1) @ flat(vr)
      out = out.transpose(1, 2).reshape(b, h, w, -1)
    return self.out_proj(out + lepe)


class FeedForwardNetwork(nn.Module):

  def __init__(self, embed_dim, ffn_dim):
    super().__init__()
    self.fc1 = nn.Linear(embed_dim, ffn_dim)
    self.fc2 = nn.Linear(ffn_dim, embed_dim)
    self.dwconv = DWConv2d(ffn_dim, 3, 1)

  def forward(self, x):
    x = F.gelu(self.fc1(x))
    return self.fc2(x + self.dwconv(x))


class RetBlock(nn.Module):

  def __init__(self, embed_dim, num_heads, ffn_dim, decomposed, layerscale,
               layer_init_values):
    super().__init__()
    self.layerscale = layerscale
    self.retention_layer_norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.retention = VisionRetention(embed_dim, num_heads, decomposed)
    self.final_layer_norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.ffn = FeedForwardNetwork(embed_dim, ffn_dim)
    self.pos = DWConv2d(embed_dim, 3, 1)
    if layerscale:
      self.gamma_1 = nn.Parameter(layer_init_values * torch.ones(1, 1, 1, embed_dim))
      self.gamma_2 = nn.Parameter(layer_init_values * torch.ones(1, 1, 1, embed_dim))

  def forward(self, x, rel_pos):
    x = x + self.pos(x)
    y = self.retention(self.retention_layer_norm(x), rel_pos)
    x = x + (self.gamma_1 * y if self.layerscale else y)
    y = self.ffn(self.final_layer_norm(x))
    return x + (self.gamma_2 * y if self.layerscale else y)


class PatchMerging(nn.Module):

  def __init__(self, dim, out_dim):
    super().__init__()
    self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1)
    self.norm = nn.BatchNorm2d(out_dim)

  def forward(self, x):
    return self.norm(self.reduction(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class BasicLayer(nn.Module):

  def __init__(self, embed_dim, out_dim, depth, num_heads, init_value, heads_range,
               ffn_dim, decomposed, layerscale, layer_init_values):
    super().__init__()
    self.decomposed = decomposed
    self.Relpos = RetNetRelPos2d(embed_dim, num_heads, init_value, heads_range)  # pylint: disable=invalid-name
    self.blocks = nn.ModuleList([
        RetBlock(embed_dim, num_heads, ffn_dim, decomposed, layerscale, layer_init_values)
        for _ in range(depth)])
    self.downsample = PatchMerging(embed_dim, out_dim) if out_dim else None

  def forward(self, x):
    rel_pos = self.Relpos(x.shape[1], x.shape[2], self.decomposed)
    for block in self.blocks:
      x = block(x, rel_pos)
    return x, (self.downsample(x) if self.downsample is not None else x)


class PatchEmbed(nn.Module):

  def __init__(self, in_chans, embed_dim):
    super().__init__()
    half = embed_dim // 2
    self.proj = nn.Sequential(
        nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, embed_dim, 3, 2, 1), nn.BatchNorm2d(embed_dim), nn.GELU(),
        nn.Conv2d(embed_dim, embed_dim, 3, 1, 1), nn.BatchNorm2d(embed_dim))

  def forward(self, x):
    return self.proj(x).permute(0, 2, 3, 1)


class VisRetNet(nn.Module):

  def __init__(self, in_chans=3, num_classes=1000, embed_dims=(96, 192, 384, 768),
               depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), init_values=(1, 1, 1, 1),
               heads_ranges=(3, 3, 3, 3), mlp_ratios=(3, 3, 3, 3),
               chunkwise_recurrents=(True, True, False, False), projection=1024,
               layerscales=(False, False, False, False), layer_init_values=1e-6):
    super().__init__()
    self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
    num_layers = len(depths)
    self.layers = nn.ModuleList([
        BasicLayer(embed_dims[i], embed_dims[i + 1] if i < num_layers - 1 else None,
                   depths[i], num_heads[i], init_values[i], heads_ranges[i],
                   int(mlp_ratios[i] * embed_dims[i]), chunkwise_recurrents[i],
                   layerscales[i], layer_init_values)
        for i in range(num_layers)])
    self.proj = nn.Linear(embed_dims[-1], projection)
    self.norm = nn.BatchNorm2d(projection)
    self.head = nn.Linear(projection, num_classes) if num_classes > 0 else nn.Identity()

  def forward_stages(self, x):
    x = self.patch_embed(x)
    stages = []
    for layer in self.layers:
      out, x = layer(x)
      stages.append(out)
    x = self.norm(self.proj(x).permute(0, 3, 1, 2)).flatten(2, 3)
    features = (x * torch.sigmoid(x)).mean(-1)
    return self.head(features), features, stages


def build(**config) -> nn.Module:
  return VisRetNet(**config)


def forward(model, images):
  return model.forward_stages(images)


# The official registered configurations (for parameter counts).
CONFIGS = {
    "rmt_tiny": dict(embed_dims=[64, 128, 256, 512], depths=[2, 2, 8, 2],
                     num_heads=[4, 4, 8, 16], init_values=[2, 2, 2, 2],
                     heads_ranges=[4, 4, 6, 6], mlp_ratios=[3, 3, 3, 3],
                     chunkwise_recurrents=[True, True, False, False]),
    "rmt_small": dict(embed_dims=[64, 128, 256, 512], depths=[3, 4, 18, 4],
                      num_heads=[4, 4, 8, 16], init_values=[2, 2, 2, 2],
                      heads_ranges=[4, 4, 6, 6], mlp_ratios=[4, 4, 3, 3],
                      chunkwise_recurrents=[True, True, True, False]),
    "rmt_base": dict(embed_dims=[80, 160, 320, 512], depths=[4, 8, 25, 8],
                     num_heads=[5, 5, 10, 16], init_values=[2, 2, 2, 2],
                     heads_ranges=[5, 5, 6, 6], mlp_ratios=[4, 4, 3, 3],
                     chunkwise_recurrents=[True, True, True, False],
                     layerscales=[False, False, True, True]),
    "rmt_large": dict(embed_dims=[112, 224, 448, 640], depths=[4, 8, 25, 8],
                      num_heads=[7, 7, 14, 20], init_values=[2, 2, 2, 2],
                      heads_ranges=[6, 6, 6, 6], mlp_ratios=[4, 4, 3, 3],
                      chunkwise_recurrents=[True, True, True, False],
                      layerscales=[False, False, True, True]),
}
