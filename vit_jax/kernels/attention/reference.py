"""Global softmax attention: the specification is ``layers.dot_product_attention``.

The model layers own the reference (vision_transformer semantics: scale
``head_dim**-0.5``, additive ``bias``, boolean ``mask``, softmax in float32); this
module points at it so that every kernel folder has its ``reference``.
"""


def attention_reference(query, key, value, *, bias=None, mask=None):
  """``vit_jax.models.layers.dot_product_attention`` (imported late: no import cycle)."""
  from vit_jax.models import layers  # pylint: disable=g-import-not-at-top
  return layers.dot_product_attention(query, key, value, bias=bias, mask=mask)
