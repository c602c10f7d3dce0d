"""Quantization of any registered model through qwix: post-training (PTQ) and in training (QAT).

qwix intercepts the ``dot_general`` / ``einsum`` / ``conv_general_dilated`` calls of a
Flax module and quantizes the operands its rules select (regexes on module paths, like
the sharding rules). Modes (``MODES``):

  int8   weights and activations int8 (w8a8), per-channel weight scales
  int4   weights int4, activations float (weight-only)
  w4a8   weights int4, activations int8
  fp8    weights and activations float8_e4m3fn

qwix quantizes a convolution only when weights and activations share one type, so in
int4 and w4a8 the convolutions (patch embeddings) stay float. By default activations
are scaled per token at run time (dynamic range), so PTQ needs no calibration data.
``Settings(static=True)`` gives the dense layers' inputs fixed scales instead, from a
calibration pass (``calibrate``: the mean per-position absmax over a few batches; static
range quantization), so the program computes no activation ranges at run time; the
attention's activation-by-activation einsums keep dynamic scales.

  qmodel, qvariables = quantization.ptq(model, variables, "int8", sample_images)
  logits = qmodel.apply(qvariables, images, train=False)  # int8 dots in the program

QAT wraps the model once (``qat_model``); its parameters stay float, so a QAT run
checkpoints, resumes and is post-training quantized like any other.
"""

import dataclasses
import re
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from etils import epath
from flax import linen as nn

MODES = {
    "int8": dict(weight_qtype=jnp.int8, act_qtype=jnp.int8),
    "int4": dict(weight_qtype=jnp.int4),
    "w4a8": dict(weight_qtype=jnp.int4, act_qtype=jnp.int8),
    "fp8": dict(weight_qtype=jnp.float8_e4m3fn, act_qtype=jnp.float8_e4m3fn),
}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to quantize: ``mode`` (see ``MODES``) on modules whose path matches ``targets``
  and not ``exclude`` (regexes over the Flax path, e.g. ``Transformer/encoderblock_0/...``)."""
  mode: str = "int8"
  targets: str = ".*"
  exclude: Optional[str] = None
  static: bool = False  # calibrated activation scales of the dense layers (see above)

  @classmethod
  def from_config(cls, config: Any) -> "Settings":
    return cls(mode=config.get("mode") or "int8", targets=config.get("targets") or ".*",
               exclude=config.get("exclude") or None)


def rules(settings: Settings, *, training: bool = False) -> list:
  """qwix rules for ``settings`` (the first matching rule wins; excluded paths get none)."""
  if settings.mode not in MODES:
    raise ValueError(f"quantization.mode={settings.mode!r}; use one of {sorted(MODES)}")
  kwargs = dict(MODES[settings.mode])
  rule_type = qwix.QtRule if training else qwix.QuantizationRule
  found = []
  if settings.exclude:  # a rule quantizing nothing takes these paths first
    found.append(rule_type(module_path=settings.exclude))
  if kwargs.get("act_qtype") != kwargs["weight_qtype"]:  # see the module docstring
    found.append(rule_type(module_path=settings.targets, op_names=("conv_general_dilated",)))
  if settings.static:
    if "act_qtype" not in kwargs:
      raise ValueError(f"quantization: static activation scales need a mode that "
                       f"quantizes activations; {settings.mode!r} is weight-only")
    found.append(rule_type(module_path=settings.targets, op_names=("dot_general",),
                           act_static_scale=True, act_calibration_method="absmax",
                           **kwargs))
  found.append(rule_type(module_path=settings.targets, **kwargs))
  return found


def calibrate(model: nn.Module, variables: dict, settings: Settings,
              batches: Iterable[Any]) -> dict:
  """The activation statistics ``ptq`` needs for ``settings.static``: ``model``'s
  inputs to each quantized dense layer over ``batches``, averaged (qwix's
  ``quant_stats`` collection)."""
  qmodel = qwix.quantize_model(model, qwix.QtProvider(rules(settings, training=True)))

  @jax.jit
  def step(stats, images):
    _, updated = qmodel.apply({**variables, **stats}, images, train=False,
                              mutable=["quant_stats"])
    return updated

  stats, count = {}, 0
  for images in batches:
    stats, count = step(stats, jnp.asarray(images)), count + 1
  if not count:
    raise ValueError("quantization.calibrate: no calibration batches")
  return stats["quant_stats"]


def quantized_count(variables: Any) -> int:
  """How many quantized arrays a (PTQ) variables tree holds."""
  is_quantized = lambda x: isinstance(x, qwix.QArray)
  return sum(map(is_quantized, jax.tree.leaves(variables, is_leaf=is_quantized)))


def _check_reached(model: nn.Module, count: int, settings: Settings) -> None:
  if not count:
    raise ValueError(
        f"quantization: no weight of {type(model).__name__} is reached by qwix for "
        f"targets={settings.targets!r} exclude={settings.exclude!r} (qwix quantizes "
        "lax.dot_general, jnp.einsum/dot and lax.conv_general_dilated calls; this family "
        "computes its layers otherwise, or the regexes match no module)")


def qat_model(model: nn.Module, settings: Settings) -> nn.Module:
  """``model`` with fake-quantized (straight-through) dots and convolutions for training."""
  return qwix.quantize_model(model, qwix.QtProvider(rules(settings, training=True)))


def _innermost_module_path(traceback) -> Optional[str]:
  """The Flax path of the innermost module whose method is on ``traceback``."""
  path = None
  while traceback is not None:
    owner = traceback.tb_frame.f_locals.get("self")
    if isinstance(owner, nn.Module) and owner.scope is not None:
      path = "/".join(owner.scope.path)
    traceback = traceback.tb_next
  return path


def _init(model: nn.Module, init: Any, settings: Settings) -> Any:
  """``init()``, with qwix's error on an op it cannot quantize (the gated scan's
  3-operand einsum of ViG and Vim) turned into one naming the module and the way out."""
  try:
    return init()
  except ValueError as e:
    if "Unsupported einsum format" not in str(e):
      raise
    where = _innermost_module_path(e.__traceback__)
    every = re.sub(r"_\d+(?=/|$)", r"_\\d+", where or "")  # the module in every block
    raise ValueError(
        f"quantization: qwix cannot quantize a call in {type(model).__name__} at module "
        f"{where!r} ({str(e).split(' operands=')[0]}); keep that module float with "
        f"quantization.exclude, e.g. exclude='{every}' (a regex matching whole module "
        "paths: its sub-modules stay quantized)") from None


def reached(model: nn.Module, settings: Settings, *inputs: Any, **kwargs: Any) -> int:
  """How many weights of ``model`` (initialised with ``inputs``, arrays or
  ``jax.ShapeDtypeStruct``s) the rules of ``settings`` quantize; only shapes are traced."""
  qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules(settings)))
  abstract = _init(model, lambda: jax.eval_shape(
      lambda *x: qmodel.init(jax.random.key(0), *x, train=False, **kwargs), *inputs),
                   settings)
  return sum(map(_with_aux, jax.tree.leaves(abstract, is_leaf=_with_aux)))


def from_config(model: nn.Module, config: Optional[Any],
                check_inputs: Optional[tuple] = None) -> nn.Module:
  """The QAT model ``config.quantization`` asks for (``mode`` set), else ``model``.

  With ``check_inputs`` (the inputs ``model.init`` takes; ``()`` for none) a setting
  that reaches no weight of the model is an error rather than a float run in disguise.
  """
  if not config or not config.get("mode"):
    return model
  settings = Settings.from_config(config)
  if check_inputs is not None:
    _check_reached(model, reached(model, settings, *check_inputs), settings)
  return qat_model(model, settings)


def ptq(model: nn.Module, variables: dict, settings: Settings | str, sample: jax.Array,
        quant_stats: Optional[dict] = None) -> tuple[nn.Module, dict]:
  """Post-training quantization: ``(quantized model, quantized variables)``.

  ``sample`` is an input batch of the right shape (its values are not used);
  ``quant_stats`` (from ``calibrate``) is needed with ``settings.static``. Raises
  ValueError when the rules reach no weight of the model.
  """
  if isinstance(settings, str):
    settings = Settings(mode=settings)
  if settings.static and not quant_stats:
    raise ValueError("quantization: static activation scales need the statistics of a "
                     "calibration pass (quantization.calibrate)")
  qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules(settings)))
  sample = jax.ShapeDtypeStruct(sample.shape, sample.dtype)
  abstract = _init(model, lambda: jax.eval_shape(
      lambda x: qmodel.init(jax.random.key(0), x, train=False), sample), settings)
  params = qwix.quantize_params(variables["params"], abstract["params"],
                                quant_stats or {})
  others = {k: v for k, v in variables.items() if k not in ("params", "quant_stats")}
  _check_reached(model, quantized_count(params), settings)
  return qmodel, {"params": params, **others}


def _with_aux(x) -> bool:  # qwix's WithAux: a parameter with how it is quantized
  return hasattr(x, "how") and hasattr(x, "array")


def to_storage(variables: Any) -> Any:
  """A tree of plain arrays: each quantized array becomes ``{"qvalue", "scale"}``.

  int4 values are packed two per byte into uint8 (what a checkpoint stores).
  """
  def split(x):
    x = x.array if _with_aux(x) else x
    if not isinstance(x, qwix.QArray):
      return x
    qvalue = _pack_int4(x.qvalue) if x.qvalue.dtype == jnp.int4 else x.qvalue
    out = {"qvalue": qvalue, "scale": x.scale}
    if x.zero_point is not None:
      out["zero_point"] = x.zero_point
    return out
  return jax.tree.map(split, variables, is_leaf=_with_aux)


def from_storage(stored: Any, abstract: Any) -> Any:
  """Inverse of ``to_storage`` given the quantized model's abstract variables."""
  def join(path, template):
    value = stored
    for key in path:
      value = value[key.key]
    if not _with_aux(template):
      return value
    qarray = template.array
    if not isinstance(qarray, qwix.QArray):  # a calibrated activation scale
      return template.replace(array=jnp.asarray(value, qarray.dtype))
    qvalue = value["qvalue"]
    if qarray.qvalue.dtype == jnp.int4:
      qvalue = _unpack_int4(np.asarray(qvalue), qarray.qvalue.shape)
    return template.replace(array=qwix.QArray(
        qvalue=jnp.asarray(qvalue, qarray.qvalue.dtype), scale=value["scale"],
        zero_point=value.get("zero_point"), qtype=qarray.qtype))
  return jax.tree_util.tree_map_with_path(join, abstract, is_leaf=_with_aux)


def _pack_int4(values: jax.Array) -> np.ndarray:
  flat = np.asarray(values.astype(jnp.int8)).reshape(-1)
  flat = np.concatenate([flat, np.zeros(flat.size % 2, np.int8)])
  nibbles = (flat & 0xF).astype(np.uint8)
  return nibbles[0::2] | (nibbles[1::2] << 4)


def _unpack_int4(packed: np.ndarray, shape) -> np.ndarray:
  nibbles = np.stack([packed & 0xF, packed >> 4], -1).reshape(-1).astype(np.int8)
  nibbles = np.where(nibbles > 7, nibbles - 16, nibbles)  # sign of the 4-bit value
  return nibbles[:int(np.prod(shape))].reshape(shape)


def tree_bytes(tree: Any) -> int:
  """Bytes of the arrays of ``tree`` (quantized arrays by their stored dtypes)."""
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(to_storage(tree)))


def directory_bytes(path) -> int:
  """Bytes of the files under ``path`` (local or gs://, through etils.epath)."""
  return sum(directory_bytes(child) if child.is_dir() else child.stat().length
             for child in epath.Path(path).iterdir())
