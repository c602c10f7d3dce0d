"""DynamicViT's distillation terms for the classification trainer.

DynamicViT (Rao et al., 2021) trains its token predictors with three extra terms
(the published ``DistillDiffPruningLoss_dynamic``, as its DeiT recipe sets it:
``ratio_weight=2.0, distill_weight=0.5, mse_token=True``)::

  loss = CE(logits, labels)
       + ratio_weight / stages * sum_s mean_b (mean_n keep_s - rho**s)**2   (keep ratio)
       + distill_weight * KL(softmax(teacher_logits) || softmax(logits))     (logits)
       + distill_weight * mean over kept tokens and channels of
                          (tokens - teacher_tokens)**2                       (tokens)

The keep-ratio term is the model's: each pruning block sows it into the ``aux``
collection (``token_pruning_ratio_weight``, see ``models/vit.py``), which the trainer
adds as it adds MoE's auxiliary losses. This module adds the two distillation terms.
``tokens`` are the student's patch tokens after the final norm; in training none are
dropped, and ``keep`` (the last stage's marks, as ``token_size`` of the last block)
says which count. The KL is summed over classes and averaged over the batch
(``reduction="batchmean"``).

``config.dynamic_vit`` (absent, None or ``distill_weight`` 0: no distillation)::

  distill_weight  weight of each distillation term (the paper's 0.5)
  teacher         "self": the model being trained, run without pruning, in eval mode
                  and without gradient; or a vit_jax workdir / checkpoint directory of
                  the un-pruned model (the paper's teacher: the pretrained backbone
                  the student starts from), loaded as ``config.distillation``'s is
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from vit_jax import losses
from vit_jax.trainers import distillation

Array = jax.Array


def token_mse(tokens: Array, teacher_tokens: Array, keep: Array) -> Array:
  """Mean squared difference over the kept tokens (``keep > 0.5``) and channels; 0
  when no token is kept. ``tokens`` ``[B, n, D]``, ``keep`` ``[B, n]`` (no gradient
  through it, as the published code detaches the decision)."""
  mask = jax.lax.stop_gradient(keep > 0.5).astype(jnp.float32)
  squared = jnp.mean((tokens.astype(jnp.float32)
                      - teacher_tokens.astype(jnp.float32)) ** 2, axis=-1)
  count = mask.sum()
  return jnp.where(count > 0, jnp.sum(squared * mask) / jnp.maximum(count, 1.0), 0.0)


def final_norm_filter(mdl, method: str) -> bool:
  """A ``capture_intermediates`` filter: the encoder's final norm (the normed tokens)."""
  return method == "__call__" and tuple(mdl.scope.path) == ("Transformer", "encoder_norm")


def final_tokens(intermediates: Any) -> Array:
  return intermediates["Transformer"]["encoder_norm"]["__call__"][0]


@dataclasses.dataclass(frozen=True)
class Distiller:
  """The un-pruned teacher and the two distillation terms of one training step."""
  weight: float
  teacher: Any  # the student's architecture without pruning
  own_weights: bool  # teacher "self": the student's current parameters
  num_prefix_tokens: int
  last_block: int

  def teacher_outputs(self, params: Any, model_state: Any, teacher_variables: Any,
                      images: Array) -> tuple[Array, Array]:
    """``(logits, normed tokens)`` of the teacher in eval mode, without gradient."""
    variables = ({"params": params, **model_state} if self.own_weights
                 else teacher_variables)
    logits, state = self.teacher.apply(
        jax.lax.stop_gradient(variables), images, train=False,
        capture_intermediates=final_norm_filter, mutable=["intermediates"])
    return (jax.lax.stop_gradient(logits),
            jax.lax.stop_gradient(final_tokens(state["intermediates"])))

  def loss(self, logits: Array, intermediates: Any, teacher_logits: Array,
           teacher_tokens: Array) -> tuple[Array, dict[str, Array]]:
    """``weight * (logit KL + token MSE)`` and both terms as metrics."""
    p = self.num_prefix_tokens
    keep = intermediates["Transformer"][f"token_size_{self.last_block}"][0][:, p:]
    # KL(teacher || student) summed over classes, batch mean: DeiT's soft term at tau 1.
    kl = losses.distillation_loss(logits, teacher_logits, "soft", 1.0)
    mse = token_mse(final_tokens(intermediates)[:, p:], teacher_tokens[:, p:], keep)
    return self.weight * (kl + mse), {"dynamic_vit/logit_kl": kl,
                                      "dynamic_vit/token_mse": mse}


def setup(config: Optional[ml_collections.ConfigDict], model: Any, model_name: str,
          model_kwargs: dict, num_classes: int, image_shape: tuple[int, ...], mesh
          ) -> tuple[Optional[Distiller], Any]:
  """``(Distiller or None, teacher variables or None)`` from ``config.dynamic_vit``."""
  if not config or not config.get("distill_weight"):
    return None, None
  if getattr(model, "token_pruning", 1.0) >= 1.0:
    raise ValueError("config.dynamic_vit.distill_weight > 0 distils a DynamicViT: set "
                     "config.model.token_pruning < 1 on a plain ViT (without LoRA or "
                     f"quantization wrappers), got {model_name} with "
                     f"token_pruning={getattr(model, 'token_pruning', None)}")
  teacher_source = config.get("teacher") or "self"
  unpruned = {k: v for k, v in model_kwargs.items() if not k.startswith("token_pruning")}
  teacher = model.clone(token_pruning=1.0)
  teacher_variables = None
  if teacher_source != "self":
    teacher, teacher_variables = distillation.load_teacher(ml_collections.ConfigDict(dict(
        teacher_model=model_name, teacher=unpruned, teacher_checkpoint=teacher_source,
        type="soft", alpha=1.0, tau=1.0)),  # (type, alpha, tau: unused here)
        num_classes, image_shape, mesh)
  return Distiller(weight=float(config.distill_weight), teacher=teacher,
                   own_weights=teacher_source == "self",
                   num_prefix_tokens=model.num_prefix_tokens,
                   last_block=model.num_layers - 1), teacher_variables
