"""Random weights for PyTorch reference models (torch only: no timm import to pay for)."""

import torch


def randomize(model: torch.nn.Module, scale: float, generator: torch.Generator) -> None:
  """Replaces every weight, norm and BatchNorm statistic with random values.

  timm's default init zeroes heads and biases and leaves norms at 1/0, which would
  let a converter that mixes up those tensors pass a parity test.
  """
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator) * scale
      is_norm_scale = p.ndim == 1 and name.endswith("weight")
      p.copy_(1.0 + noise if is_norm_scale else noise)
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(torch.randn(b.shape, generator=generator) * scale)
      elif name.endswith("running_var"):
        b.copy_(1.0 + torch.rand(b.shape, generator=generator) * scale)
