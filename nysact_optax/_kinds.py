"""The layer kinds NysAct covers: one table, read by both captures, the
validation and the statistics.

Each :class:`LayerKind` names its ``flax.linen`` and ``flax.nnx`` classes (as
strings, so that this module and the statistics load without flax), builds
the layer's spec from the module's attributes and the call's arguments, and
gives the statistics function of that spec. Adding a layer kind is adding
one entry to :data:`KINDS` (and, for a new spec type, its statistics code in
:mod:`nysact_optax._covariance`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nysact_optax import _covariance
from nysact_optax._layers import ConvSpec, DenseSpec, EinsumSpec, LayerSpec, int_tuple

__all__ = [
  "KINDS",
  "LayerKind",
  "classes",
  "int_axes",
  "kind_of",
  "register",
  "statistics_of",
  "unregister",
]


def int_axes(axes: Any) -> tuple[int, ...]:
  """An int or a sequence of ints as a tuple of ints (``None``: empty).

  Examples:
    >>> int_axes(-1), int_axes((0, 2)), int_axes(None), int_axes({1: 4})
    ((-1,), (0, 2), (), (1,))
  """
  if axes is None:
    return ()
  if isinstance(axes, Mapping):  # nnx.LinearGeneral(batch_axis={axis: size})
    return tuple(int(a) for a in axes)
  if isinstance(axes, Sequence):
    return tuple(int(a) for a in axes)
  return (int(axes),)


def _einsum_spec(layer: Any, args: tuple, kwargs: dict) -> EinsumSpec:
  equation = kwargs.get("einsum_str") or (args[0] if args else None) or layer.einsum_str
  return EinsumSpec((equation or "").replace(" ", ""))


def _general_spec(layer: Any, args: tuple, kwargs: dict) -> DenseSpec:
  for name in ("batch_dims", "batch_axis"):  # linen, NNX
    batch = getattr(layer, name, None)
    if int_axes(batch):
      shown = dict(batch) if isinstance(batch, Mapping) else batch
      raise NotImplementedError(
        f"{type(layer).__name__} with {name}={shown!r} has one kernel per "
        "batch index; exclude it with exclude=[...]"
      )
  return DenseSpec(int_axes(layer.axis))


def _dense_spec(layer: Any, args: tuple, kwargs: dict) -> DenseSpec:
  return DenseSpec((-1,))


def _conv_spec(conv: Any, args: tuple, kwargs: dict) -> ConvSpec:
  """linen and NNX ``Conv`` keep the same options under the same names; they
  are canonicalised as flax does before calling ``lax.conv_general_dilated``."""
  from flax.linen import linear as flax_linear  # only ever given a flax Conv

  ks = conv.kernel_size
  ks = int_tuple(ks, 1 if isinstance(ks, int) else len(ks))
  n = len(ks)
  padding = flax_linear.canonicalize_padding(conv.padding, n)
  if not isinstance(padding, str):
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return ConvSpec(
    kernel_size=ks,
    strides=int_tuple(conv.strides, n),
    padding=padding,
    input_dilation=int_tuple(conv.input_dilation, n),
    kernel_dilation=int_tuple(conv.kernel_dilation, n),
    feature_group_count=int(conv.feature_group_count),
  )


def _lstm_gate_spec(gate: Any, args: tuple, kwargs: dict) -> DenseSpec:
  """``OptimizedLSTMCell``'s gates hand out their kernel and bias and the cell
  multiplies them with the very input the gate was called with."""
  cell = type(getattr(gate, "parent", None)).__name__
  if cell != "OptimizedLSTMCell":
    raise NotImplementedError(
      f"DenseParams inside {cell} hands out its kernel and the caller computes "
      "the product itself, which the capture cannot see"
    )
  return DenseSpec((-1,))


@dataclasses.dataclass(frozen=True)
class LayerKind:
  """One kind of layer NysAct preconditions.

  Attributes:
    name: the kind's name, as errors and docs call it.
    linen: ``flax.linen`` class paths (``"module:Class"``) of this kind.
    nnx: ``flax.nnx`` class paths of this kind.
    spec: ``spec(layer, call_args, call_kwargs)``: the layer's spec from its
      attributes and the arguments of one call after the input; raises
      ``NotImplementedError`` with the reason for a configuration NysAct
      cannot precondition.
    spec_type: the spec class ``spec`` returns.
    statistics: ``statistics(x, spec, sketch, has_bias, dtype, precision) ->
      (A^T A S, rows)`` of one call's input ``x``.
    shown: what users write for this kind's linen classes in errors and
      docs, where it is not the class itself.

  Examples:
    >>> [kind.name for kind in KINDS]
    ['einsum', 'general', 'dense', 'conv', 'lstm_gate']
  """

  name: str
  linen: tuple[str, ...]
  nnx: tuple[str, ...]
  spec: Callable[[Any, tuple, dict], LayerSpec]
  spec_type: type
  statistics: Callable[..., tuple[Any, int]]
  shown: str = ""


#: The registered kinds, most specific first where classes overlap
#: (:func:`register` adds one).
KINDS: list[LayerKind] = [
  LayerKind(
    "einsum",
    ("flax.linen:Einsum",),
    ("flax.nnx:Einsum",),
    _einsum_spec,
    EinsumSpec,
    _covariance.dense_stats,
  ),
  LayerKind(
    "general",
    ("flax.linen:DenseGeneral",),
    ("flax.nnx:LinearGeneral",),
    _general_spec,
    DenseSpec,
    _covariance.dense_stats,
  ),
  LayerKind(
    "dense",
    ("flax.linen:Dense",),
    ("flax.nnx:Linear",),
    _dense_spec,
    DenseSpec,
    _covariance.dense_stats,
  ),
  LayerKind(
    "conv", ("flax.linen:Conv",), ("flax.nnx:Conv",), _conv_spec, ConvSpec, _covariance.conv_stats
  ),
  # flax.linen.OptimizedLSTMCell's eight gates (NNX's cell is made of nnx.Linear).
  LayerKind(
    "lstm_gate",
    ("flax.linen.recurrent:DenseParams",),
    (),
    _lstm_gate_spec,
    DenseSpec,
    _covariance.dense_stats,
    shown="nn.OptimizedLSTMCell",
  ),
]
# The statistics of each spec type; a spec is dispatched by its own type
# first, then its base classes (a DenseSpec subclass may have its own).
_STATISTICS: dict[type, Callable[..., tuple[Any, int]]] = {}
for _kind in KINDS:
  _STATISTICS.setdefault(_kind.spec_type, _kind.statistics)


def register(kind: LayerKind) -> LayerKind:
  """Adds a layer kind to :data:`KINDS` (both captures and the statistics
  read it from then on); returns it.

  Statistics are dispatched by spec type, so a kind with statistics of its
  own needs a spec type of its own (a subclass of ``DenseSpec``, say): a
  kind whose spec type already has other statistics is refused, never
  silently served the other statistics.

  Raises:
    ValueError: the name is taken, or the spec type has other statistics.
  """
  if any(k.name == kind.name for k in KINDS):
    raise ValueError(f"a layer kind named {kind.name!r} is registered already")
  known = _STATISTICS.get(kind.spec_type)
  if known is not None and known is not kind.statistics:
    raise ValueError(
      f"layer kind {kind.name!r}: its spec type {kind.spec_type.__name__} has the "
      f"statistics {known.__name__} already, not statistics={kind.statistics.__name__}: "
      f"give the kind a spec type of its own (a subclass of {kind.spec_type.__name__})"
    )
  KINDS.append(kind)
  _STATISTICS[kind.spec_type] = kind.statistics
  return kind


def unregister(name: str) -> None:
  """Removes the kind ``name`` that :func:`register` added."""
  (kind,) = [k for k in KINDS if k.name == name]
  KINDS.remove(kind)
  if not any(k.spec_type is kind.spec_type for k in KINDS):
    del _STATISTICS[kind.spec_type]


def _resolve(path: str) -> type:
  module, name = path.split(":")
  return getattr(importlib.import_module(module), name)


@functools.cache
def _classes(framework: str, kinds: tuple[LayerKind, ...]) -> tuple[tuple[type, LayerKind], ...]:
  return tuple((_resolve(path), kind) for kind in kinds for path in getattr(kind, framework))


def classes(framework: str) -> tuple[tuple[type, LayerKind], ...]:
  """``(class, kind)`` of every covered class of ``"linen"`` or ``"nnx"``
  (imports that part of flax)."""
  return _classes(framework, tuple(KINDS))


def kind_of(layer: Any, table: Sequence[tuple[type, LayerKind]]) -> LayerKind | None:
  """The kind of the most derived covered class ``layer`` is an instance of."""
  by_class = dict(table)
  return next((by_class[c] for c in type(layer).__mro__ if c in by_class), None)


def statistics_of(spec: LayerSpec) -> Callable[..., tuple[Any, int]]:
  """The statistics function of a spec: its own type's, else its nearest
  base class's.

  Examples:
    >>> statistics_of(ConvSpec((3,), (1,), "SAME", (1,), (1,))).__name__
    'conv_stats'
  """
  for cls in type(spec).__mro__:
    if cls in _STATISTICS:
      return _STATISTICS[cls]
  raise TypeError(f"no layer kind has the spec {spec!r}")


def covered_names(framework: str) -> list[str]:
  """The covered classes of ``"linen"`` or ``"nnx"``, as users write them.

  Examples:
    >>> covered_names("nnx")
    ['nnx.Einsum', 'nnx.LinearGeneral', 'nnx.Linear', 'nnx.Conv']
  """
  short = {"linen": "nn", "nnx": "nnx"}[framework]
  names = [
    (k.shown if framework == "linen" and k.shown else f"{short}.{p.split(':')[1]}")
    for k in KINDS
    for p in getattr(k, framework)
  ]
  return names
