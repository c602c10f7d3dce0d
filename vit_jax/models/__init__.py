"""Vision transformer families, created by timm-style name.

  model = vit_jax.models.create("vit_base_patch16_224", num_classes=10)
  variables = model.init(jax.random.key(0), images)  # images: NHWC
  logits = model.apply(variables, images, train=False)

  model = vit_jax.models.create("swin_tiny_patch4_window7_224", pretrained=True)
  logits = model(images, train=False)  # bound to the default tag's weights
  vit_jax.models.list_pretrained("swin_*")  # ["swin_base_patch4_window12_384.ms_in1k", ...]
"""

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import tree
from vit_jax.models import registry
from vit_jax.models.registry import list_models, model_info, register_model, register_variant
# Family files register their variants at import.
from vit_jax.models import vit  # noqa: F401
from vit_jax.models import efficientvit_mit  # noqa: F401
from vit_jax.models import metaformer  # noqa: F401
from vit_jax.models import efficientvit_msra  # noqa: F401
from vit_jax.models import shvit  # noqa: F401
from vit_jax.models import pvt_v2  # noqa: F401
from vit_jax.models import pvt  # noqa: F401
from vit_jax.models import cswin  # noqa: F401
from vit_jax.models import text  # noqa: F401
from vit_jax.models import two_tower  # noqa: F401
from vit_jax.models import swin  # noqa: F401
from vit_jax.models import maxvit  # noqa: F401
from vit_jax.models import gcvit  # noqa: F401
from vit_jax.models import deit  # noqa: F401
from vit_jax.models import crossvit  # noqa: F401
from vit_jax.models import cvt  # noqa: F401
from vit_jax.models import t2t_vit  # noqa: F401
from vit_jax.models import tnt  # noqa: F401
from vit_jax.models import rmt  # noqa: F401
from vit_jax.models import vig  # noqa: F401
from vit_jax.models import vig_h  # noqa: F401
from vit_jax.models import vim  # noqa: F401
from vit_jax.models import vir  # noqa: F401
from vit_jax.models import naflex


def create(name: str, pretrained: Union[bool, str] = False, **overrides):
  """Creates a registered model by name; timm's ``create_model(name, pretrained=...)``.

  ``pretrained=False``: the plain module (``model.init`` gives random weights).
  ``pretrained=True`` (the default tag, or the tag in ``"name.tag"``) or
  ``pretrained="tag"``: the module bound to that tag's converted weights, downloaded
  on first use (``vit_jax.weights.pretrained.create``; ``model.unbind()`` gives
  ``(module, variables)`` for training). Overrides replace the variant's defaults
  either way; with weights, a different ``num_classes`` gets a fresh head.
  """
  if "naflex" in overrides and "naflex" not in registry.settings(name):
    # NaFlex/NaViT (models/naflex.py): the same ViT over the naflex pp op's patches.
    wanted = overrides.pop("naflex")
    model = create(name, pretrained, **overrides)
    return naflex.naflex(model) if wanted else model
  if pretrained is False or pretrained is None:
    return registry.create(name, **overrides)
  if pretrained is not True and not (isinstance(pretrained, str) and pretrained):
    raise ValueError(f"models.create({name!r}, pretrained={pretrained!r}): pretrained "
                     "takes True (the default tag), a tag name or False")
  # Imported here: the weights package converts into models, so it imports this one.
  from vit_jax.weights import pretrained as pretrained_lib  # pylint: disable=g-import-not-at-top
  return pretrained_lib.create(name, None if pretrained is True else pretrained,
                               **overrides)


def load_pretrained(name: str, tag: Optional[str] = None, *, seed: int = 0,
                    **overrides) -> dict:
  """The variables of a pretrained tag of ``name`` (``vit_jax.weights.pretrained``)."""
  from vit_jax.weights import pretrained as pretrained_lib  # pylint: disable=g-import-not-at-top
  return pretrained_lib.load_pretrained(name, tag, seed=seed, **overrides)


def list_pretrained(pattern: str = "*") -> list[str]:
  """``name.tag`` of every pretrained tag matching a shell-style pattern."""
  from vit_jax.weights import pretrained as pretrained_lib  # pylint: disable=g-import-not-at-top
  return pretrained_lib.list_pretrained(pattern)


def input_shape(name: str, batch: int = 1, channels: int = 3, **overrides):
  """The NHWC input shape a registered model takes by default."""
  size = overrides.get("image_size", model_info(name).image_size)
  height, width = (size, size) if isinstance(size, int) else size
  return (batch, height, width, channels)


def param_count(name: str, **overrides) -> int:
  """Exact number of parameters, computed abstractly (nothing is allocated)."""
  model = create(name, **overrides)
  images = jax.ShapeDtypeStruct(input_shape(name, **overrides), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  params = variables["params"]
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def forward_intermediates(model, variables, images, *, train: bool = False,
                          **apply_kwargs) -> tuple[Any, dict]:
  """Runs the model and returns ``(output, intermediates)``.

  ``intermediates`` is a flat dict of the features each family sows: per-block tokens
  for plain ViTs, per-stage NHWC maps for hierarchical ones, and ``features``
  (the pooled input of the head).
  """
  out, state = model.apply(variables, images, train=train, mutable=["intermediates"],
                           **apply_kwargs)
  return out, tree.sown(state["intermediates"])


__all__ = ["create", "load_pretrained", "list_pretrained", "list_models", "model_info", "register_model", "register_variant",
           "param_count", "input_shape", "forward_intermediates"]
