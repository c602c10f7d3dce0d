"""A PyTorch re-creation of hustvl/Vim's ``VisionMamba`` (``vim/models_mamba.py``).

Written from the official code for the parity tests (run through ``official_ref.py``
in a subprocess): same module tree and parameter names, the forward of the released
configurations (middle class token, absolute position embedding, bidirectional "v2"
Mamba with the output halved, RMSNorm, fused add+norm with a float32 residual). The
official mixer calls mamba-ssm's CUDA kernels; here they are their documented
references: ``causal_conv1d`` as a left-padded depth-wise ``F.conv1d`` and the
selective scan as ``selective_scan_ref``'s token loop.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
  """mamba-ssm's RMSNorm (``rms_norm_ref``)."""

  def __init__(self, hidden_size, eps=1e-5):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(hidden_size))

  def forward(self, x):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.weight


def selective_scan_ref(u, delta, A, B, C, D, z, delta_bias):
  """mamba-ssm's reference: u, delta, z ``[b, d, l]``; A ``[d, n]``; B, C ``[b, n, l]``."""
  delta = F.softplus(delta + delta_bias[..., None])
  x = u.new_zeros((u.shape[0], A.shape[0], A.shape[1]))
  delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
  delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
  ys = []
  for i in range(u.shape[2]):
    x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
    ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
  y = torch.stack(ys, dim=2) + u * D[:, None]
  return y * F.silu(z)


class Mamba(nn.Module):
  """``mamba_simple.Mamba`` with ``bimamba_type="v2"`` and ``if_divide_out=True``."""

  def __init__(self, d_model, d_state=16, d_conv=4, expand=2):
    super().__init__()
    self.d_inner = expand * d_model
    self.d_state, self.d_conv = d_state, d_conv
    self.dt_rank = math.ceil(d_model / 16)
    self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=False)
    for suffix in ("", "_b"):
      setattr(self, f"conv1d{suffix}", nn.Conv1d(self.d_inner, self.d_inner, d_conv,
                                                 groups=self.d_inner, padding=d_conv - 1))
      setattr(self, f"x_proj{suffix}",
              nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
      setattr(self, f"dt_proj{suffix}", nn.Linear(self.dt_rank, self.d_inner, bias=True))
    a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1)
    self.A_log = nn.Parameter(a_log.clone())
    self.D = nn.Parameter(torch.ones(self.d_inner))
    self.A_b_log = nn.Parameter(a_log.clone())
    self.D_b = nn.Parameter(torch.ones(self.d_inner))
    self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

  def _inner(self, xz, suffix):
    """``mamba_inner_fn_no_out_proj`` through the references."""
    length = xz.shape[-1]
    conv, x_proj = getattr(self, f"conv1d{suffix}"), getattr(self, f"x_proj{suffix}")
    dt_proj = getattr(self, f"dt_proj{suffix}")
    a = -torch.exp(getattr(self, "A_log" if not suffix else "A_b_log").float())
    x, z = xz.chunk(2, dim=1)
    x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=self.d_conv - 1,
                        groups=self.d_inner)[..., :length])
    x_dbl = F.linear(x.transpose(1, 2).reshape(-1, self.d_inner), x_proj.weight)
    delta = (dt_proj.weight @ x_dbl[:, :self.dt_rank].t()).reshape(
        self.d_inner, -1, length).transpose(0, 1)
    to_bnl = lambda t: t.reshape(-1, length, self.d_state).transpose(1, 2)
    b = to_bnl(x_dbl[:, self.dt_rank:self.dt_rank + self.d_state])
    c = to_bnl(x_dbl[:, -self.d_state:])
    return selective_scan_ref(x, delta, a, b, c, getattr(self, f"D{suffix}").float(), z,
                              dt_proj.bias.float())

  def forward(self, hidden_states):
    xz = self.in_proj(hidden_states).transpose(1, 2)  # [b, 2 d_inner, l]
    out = self._inner(xz, "")
    out_b = self._inner(xz.flip([-1]), "_b")
    return F.linear((out + out_b.flip([-1])).transpose(1, 2) / 2, self.out_proj.weight)


class Block(nn.Module):

  def __init__(self, dim, d_state=16):
    super().__init__()
    self.mixer = Mamba(dim, d_state=d_state)
    self.norm = RMSNorm(dim, eps=1e-5)

  def forward(self, hidden_states, residual=None):
    # rms_norm_fn(..., prenorm=True, residual_in_fp32=True): add, keep, normalise.
    residual = hidden_states if residual is None else hidden_states + residual
    residual = residual.float()
    return self.mixer(self.norm(residual)), residual


class VisionMamba(nn.Module):

  def __init__(self, img_size=224, patch_size=16, depth=24, embed_dim=192, d_state=16,
               num_classes=1000):
    super().__init__()
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
    num_patches = (img_size // patch_size) ** 2
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
    self.head = nn.Linear(embed_dim, num_classes)
    self.layers = nn.ModuleList([Block(embed_dim, d_state) for _ in range(depth)])
    self.norm_f = RMSNorm(embed_dim, eps=1e-5)

  def forward_intermediates(self, x):
    """Logits, the class token's features and the stream after every block
    (``[B, C, h, w]``, the class token left out)."""
    x = self.patch_embed.proj(x)
    batch, dim, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    middle = x.shape[1] // 2
    x = torch.cat((x[:, :middle], self.cls_token.expand(batch, -1, -1), x[:, middle:]),
                  dim=1)
    hidden, residual = x + self.pos_embed, None
    maps = []

    def patch_map(tokens):
      tokens = torch.cat((tokens[:, :middle], tokens[:, middle + 1:]), dim=1)
      return tokens.transpose(1, 2).reshape(batch, dim, h, w)

    for i, layer in enumerate(self.layers):
      hidden, residual = layer(hidden, residual)
      if i:  # the stream after block i - 1 is the residual block i received
        maps.append(patch_map(residual))
    residual = hidden + residual
    maps.append(patch_map(residual))
    features = self.norm_f(residual)[:, middle]
    return self.head(features), features, maps


CONFIGS = {
    "vim_tiny_patch16_224": dict(embed_dim=192),
    "vim_small_patch16_224": dict(embed_dim=384),
    "vim_base_patch16_224": dict(embed_dim=768),
}


def build(name=None, **config) -> nn.Module:
  """``VisionMamba(**config)``, on the released configuration ``name`` if given."""
  return VisionMamba(**{**CONFIGS.get(name, {}), **config})


def forward(model, images):
  """Logits, features and the block maps as NHWC (``official_ref.py``'s ``stage/i``)."""
  logits, features, maps = model.forward_intermediates(images)
  return logits, features, [m.permute(0, 2, 3, 1) for m in maps]
