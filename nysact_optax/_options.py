"""The settings of the NysAct transformations: one table, one options object.

Every setting a public function takes is described once, in :data:`SETTINGS`:
its check (what a bad value gets told) and its documentation. The public
functions keep optax-style keyword arguments with their own defaults; each
builds one :class:`Options` (the statistics -> factors settings that
:class:`nysact_optax._pipeline.Factors` reads) from its arguments with
:meth:`Options.build`, which validates them against the table first, and
:func:`documented` writes the table's text for every argument a function's
docstring does not describe itself, so that the API pages and ``help()``
show every argument in full.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import re
import textwrap
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nysact_optax import _nystrom, _sketch, _tree

__all__ = [
  "ADAM_SETTINGS",
  "PRECISIONS",
  "SECOND_MOMENTS",
  "SETTINGS",
  "SKETCH_REFRESH",
  "STATS_DTYPES",
  "Options",
  "Setting",
  "documented",
  "forward",
  "resolve_precision",
  "validate",
]

SKETCH_REFRESH = ("fixed", "reference")
STATS_DTYPES = ("float32", "float64")
SECOND_MOMENTS = ("keep", "rotate")
# The names jax.lax.Precision accepts (its members' names are accepted too).
PRECISIONS = (
  "default",
  "fastest",
  "bfloat16",
  "high",
  "bfloat16_3x",
  "tensorfloat32",
  "highest",
  "float32",
)


def _one_precision(value: Any) -> jax.lax.Precision | None:
  if isinstance(value, jax.lax.Precision):
    return value
  if isinstance(value, str):
    name = value.lower()
    if name in PRECISIONS:
      return jax.lax.Precision(name)
    if value in jax.lax.Precision.__members__:
      return jax.lax.Precision[value]
  return None


def resolve_precision(precision: Any) -> tuple[jax.lax.Precision, jax.lax.Precision]:
  """``(statistics, apply)`` precisions from one value or a pair of values.

  Each value is a ``jax.lax.Precision`` or a name it accepts (``"highest"``,
  ``"high"``, ``"default"``, ``"tensorfloat32"``, ...); raises ``ValueError``
  naming ``precision`` and the value otherwise.

  Examples:
    >>> resolve_precision("highest")
    (Precision.HIGHEST, Precision.HIGHEST)
    >>> resolve_precision(("high", jax.lax.Precision.DEFAULT))
    (Precision.HIGH, Precision.DEFAULT)
  """
  pair = precision if isinstance(precision, (tuple, list)) else (precision, precision)
  if len(pair) == 2:
    first, second = (_one_precision(v) for v in pair)
    if first is not None and second is not None:
      return first, second
  raise ValueError(
    "precision must be a jax.lax.Precision or one of its names "
    f"{PRECISIONS}, or a pair (statistics, apply) of them, got "
    f"precision={precision!r}"
  )


# --------------------------------------------------------------------------
# Checks: each returns what a bad value must be, or None when it is fine.

Check = Callable[[Any], "str | None"]

_STATIC = (
  "a Python int, not an array: it fixes shapes or the schedule, so it is static "
  "(with optax.inject_hyperparams, list it in static_args)"
)


def _known_now(x: Any) -> Any:
  """``x`` as a NumPy value when it is known at construction, else ``None``.

  Numbers and concrete arrays are known; tracers (values injected by
  ``optax.inject_hyperparams`` under ``jit``) cannot be checked here.
  """
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _is_int(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _static_int(low: int, *, rule: bool = False, must: str | None = None) -> Check:
  """A Python int ``>= low`` (``rule``: or a callable), never an array."""

  def check(x):
    if isinstance(x, (jax.Array, np.ndarray)):
      return _STATIC
    if rule and callable(x):
      return None
    if not isinstance(x, numbers.Integral) or x < low:
      return must or f"an integer >= {low}"
    return None

  return check


def _real(low: float, high: float | None = None, *, open_low: bool = False) -> Check:
  """A real scalar (traced values pass) in ``[low, high)`` or ``(low, ...)``."""

  def check(x):
    known = _known_now(x)
    if known is None:
      return None
    if known.ndim or not np.issubdtype(known.dtype, np.number):
      return "a real scalar"
    if high is None and open_low and not np.isfinite(known):
      return f"finite and > {low:g}"
    if open_low and not known > low:
      return f"> {low:g}"
    if high is not None and not low <= known < high:
      return f"in [{low:g}, {high:g})"
    return None

  return check


def _python_float(low: float, high: float | None = None, *, open_low: bool = False) -> Check:
  """A Python number in ``[low, high)``, ``>= low`` or ``> low``."""
  if high is not None:
    must = f"a float in [{low:g}, {high:g})"
  else:
    must = f"a float {'>' if open_low else '>='} {low:g}"

  def check(x):
    if not isinstance(x, (int, float)) or isinstance(x, bool):
      return must
    ok = (x > low if open_low else x >= low) and (high is None or x < high)
    return None if ok else must

  return check


def _one_of(options: Sequence[str]) -> Check:
  return lambda x: None if x in options else f"one of {tuple(options)}"


def _boolean(x: Any) -> str | None:
  return None if isinstance(x, (bool, np.bool_)) else "True or False"


def _seed(x: Any) -> str | None:
  known = _known_now(x)
  if known is not None and (known.ndim or not np.issubdtype(known.dtype, np.integer)):
    return "an integer"
  return None


def _layer_filter(name: str, *, optional: bool) -> Check:
  must = (
    "a list of regexes or a predicate on layer paths (a str would be read as "
    f"one pattern per letter: write {name}=['...'])"
  )

  def check(x):
    if (optional and x is None) or callable(x):
      return None
    if (
      isinstance(x, str) or not isinstance(x, Collection) or not all(isinstance(e, str) for e in x)
    ):
      return must
    return None

  return check


def _axes_ok(v: Any) -> bool:
  if isinstance(v, (tuple, list)):
    return all(_axes_ok(a) for a in v)
  return _is_int(v)


def _input_axes(x: Any) -> str | None:
  if x is None or (
    isinstance(x, Mapping) and all(isinstance(k, str) and _axes_ok(v) for k, v in x.items())
  ):
    return None
  return (
    "a mapping from layer-path regexes to an integer or a tuple of kernel axes, "
    "e.g. input_axes={'query': 1}"
  )


def _stack_axes(x: Any) -> str | None:
  if x is None or (
    isinstance(x, Mapping)
    and all(isinstance(k, str) and _is_int(v) and v >= 0 for k, v in x.items())
  ):
    return None
  return (
    "a mapping from layer-path regexes to the number of leading kernel axes "
    "that index stacked copies (an integer >= 0), e.g. stack_axes={'layers': 1}"
  )


def _axis_name(x: Any) -> str | None:
  if x is None or isinstance(x, str):
    return None
  if isinstance(x, tuple) and x and all(isinstance(a, str) for a in x):
    return None
  return "None or the name of a mapped axis (a str, or a tuple of them), e.g. axis_name='batch'"


def _stats_dtype(x: Any) -> str | None:
  try:
    name = jnp.dtype(x).name
  except TypeError:
    name = None
  return None if name in STATS_DTYPES else f"one of {STATS_DTYPES}"


def _precision(x: Any) -> str | None:
  resolve_precision(x)  # raises its own error: it also takes pairs
  return None


@dataclasses.dataclass(frozen=True)
class Setting:
  """One setting: its check and its documentation.

  Attributes:
    name: the keyword argument.
    check: ``check(value)``: ``None`` when the value is fine, else what it
      must be (the error reads ``"{name} must be {that}, got {name}=..."``).
    doc: its entry in the docstrings' ``Args`` sections.
  """

  name: str
  check: Check
  doc: str


_SETTINGS = (
  Setting(
    "rank",
    _static_int(1, rule=True),
    "sketch width ``r``, or a rule ``rank(layer_name, p) -> int``; capped at each "
    "layer's ``p`` (``rank >= p``: the layer's exact covariance).",
  ),
  Setting(
    "oversample",
    _static_int(0),
    "``k``: the sketch has ``r + k`` columns and the basis keeps the top ``r`` of the "
    "factorisation (a layer with ``r + k >= p`` is in exact mode); the sketch's "
    "state grows by ``k`` columns.",
  ),
  Setting(
    "sketch",
    _one_of(_sketch.SKETCHES),
    '``"gaussian"`` (i.i.d. ``N(0, 1/p)``) or ``"subcolumns"``.',
  ),
  Setting(
    "damping",
    _real(0.0, open_low=True),
    "``rho > 0``; also the eigenvalue shift of the paper's method (see ``relative_damping``).",
  ),
  Setting(
    "stat_decay",
    _real(0.0, 1.0),
    "EMA factor ``beta`` in ``[0, 1)`` of the statistics, bias-corrected.",
  ),
  Setting(
    "cov_update_every",
    _static_int(1),
    "statistics period ``T_cov``: the statistics enter the EMA every that many "
    "steps, step 0 included.",
  ),
  Setting(
    "inv_update_every",
    _static_int(1),
    "factor-refresh period ``T_inv``, a multiple of ``T_cov``; step 0 included.",
  ),
  Setting("seed", _seed, "seed of the sketches."),
  Setting(
    "sketch_refresh",
    _one_of(SKETCH_REFRESH),
    '``"fixed"`` (default) keeps one sketch per layer, so the EMA is exactly '
    '``A_ema S`` (streaming Nyström); ``"reference"`` draws a new sketch at every '
    "statistics update, as the authors' code does, which averages statistics of "
    "different sketches. The default was chosen by a paired-seed ablation (docs: "
    '"Choosing hyperparameters").',
  ),
  Setting(
    "nystrom",
    _one_of(_nystrom.NYSTROM_METHODS),
    '``"stable"`` (default), the stable Nyström approximation of ``A`` (Tropp et al. '
    '2017; a Gaussian sketch is orthonormalised); or ``"shifted"``, the paper\'s '
    "factorisation of ``A + rho I`` shifted by ``|lambda_min| + rho``, whose "
    "eigenvalues come out below the covariance's (all 0 when ``rho`` is comparable "
    "to them, so that ``P = I / rho``). The default was chosen by the same ablation.",
  ),
  Setting(
    "relative_damping",
    _boolean,
    "if true, each layer's damping is ``damping`` times the mean eigenvalue of its "
    "covariance, ``tr(C) / p`` (estimated at every refresh from the sketch as "
    "``tr(S^T C S) / r``), as some K-FAC variants scale theirs; ``P`` then shrinks by "
    "that mean too. If false (default), ``damping`` is the same absolute ``rho`` for "
    "every layer.",
  ),
  Setting(
    "exclude",
    _layer_filter("exclude", optional=False),
    "regexes (searched in the layer path) or a predicate on the path of layers that "
    "are not preconditioned (their leaves get the plain rule of the transformation).",
  ),
  Setting(
    "include",
    _layer_filter("include", optional=True),
    "if given, regexes or a predicate: only layers it matches (and ``exclude`` "
    "does not) are preconditioned.",
  ),
  Setting(
    "input_axes",
    _input_axes,
    "``{path regex: n}`` for kernels whose leading ``n`` axes meet the input, where "
    "the default rule (all but the bias's axes, or all but the last without a bias) "
    "is wrong, e.g. a bias-free ``DenseGeneral(features=(heads, dim))``; or "
    "``{path regex: (axes...)}`` when the input axes are not leading "
    '(``nn.Einsum("btd,ndh->btnh")``).',
  ),
  Setting(
    "stack_axes",
    _stack_axes,
    "``{path regex: n}`` for layers whose kernels carry ``n`` leading axes of "
    "stacked copies (``nn.scan``/``nn.vmap`` over params); each copy gets its own "
    "statistics and factors.",
  ),
  Setting(
    "stats_dtype",
    _stats_dtype,
    'dtype of the statistics, the factorisations and the state, ``"float32"`` '
    '(default) or ``"float64"`` (needs ``jax_enable_x64``). Activations and '
    "gradients of any float dtype (bf16, fp16) are cast to it; updates come back in "
    "the gradient's dtype.",
  ),
  Setting(
    "axis_name",
    _axis_name,
    "under ``pmap``/``shard_map``, the mapped axis over which the sketched "
    "statistics are averaged (``lax.pmean``) before they enter the EMA, so every "
    "replica holds the same factors. Gradients are not averaged here: ``pmean`` "
    "them yourself, as with any optax optimizer. Not needed under ``jit`` with "
    "sharded arrays.",
  ),
  Setting(
    "model",
    lambda x: None,  # checked where it is read (_pipeline), with its own TypeError
    "an ``nnx.Module`` whose layers' kernel layouts (``nnx.Einsum`` equations, "
    "``nnx.LinearGeneral`` axes) are read now, so that no ``input_axes`` is needed "
    "for NNX models; ``input_axes`` entries still take precedence. Only static "
    "attributes are read; no array is kept.",
  ),
  Setting(
    "precision",
    _precision,
    'the ``jax.lax.Precision`` (or its name: ``"highest"``, ``"high"``, '
    '``"default"``, ...) of the statistics\' products and convolutions and of the '
    "products that use the factors, or a pair ``(statistics, apply)``. It matters on "
    'accelerators only: at ``"default"`` a TPU rounds float32 operands to bf16 and '
    "an A100/H100 to TF32. The factorisation's products always run at ``HIGHEST``. "
    'The default, ``"highest"``, keeps ``P`` positive definite at large '
    "``lam_max / rho``, where a bf16 apply turns it indefinite; both products are "
    "thin (``r`` columns) beside the layer's own, so it costs little (docs, "
    '"Mixed precision").',
  ),
  Setting("b1", _python_float(0.0, 1.0), "Adam's first-moment decay."),
  Setting("b2", _python_float(0.0, 1.0), "Adam's second-moment decay."),
  Setting("eps", _python_float(0.0), "added to ``sqrt(v_hat)``."),
  Setting(
    "second_moment",
    _one_of(SECOND_MOMENTS),
    'at a basis refresh, ``"keep"`` (default) the rotated second moment as it is, '
    'index by index (SOAP\'s choice), or ``"rotate"`` it to the new basis as '
    "``(U_new^T U_old)^2 v_R``.",
  ),
  Setting(
    "orthogonalise",
    _boolean,
    "replace each layer's rotated Adam step ``D`` by its Newton-Schulz "
    "orthogonalisation (optax's Muon iteration) times "
    "``consistent_rms * sqrt(max(p, o))``, so that its RMS is about "
    "``consistent_rms``, Adam's, and one learning rate suits every leaf.",
  ),
  Setting(
    "consistent_rms",
    _python_float(0.0, open_low=True),
    "with ``orthogonalise``, the target RMS of a layer's step.",
  ),
)

#: Every setting by name, in documentation order.
SETTINGS: dict[str, Setting] = {s.name: s for s in _SETTINGS}
#: The same for the Adam transformations, where ``rank=0`` is Adam itself.
ADAM_SETTINGS: dict[str, Setting] = {
  **SETTINGS,
  "rank": Setting(
    "rank",
    _static_int(0, rule=True, must="an integer >= 0 (0: Adam on every leaf) or a rule"),
    "the basis width ``r`` (``rank >= p``: the exact eigenbasis), or a rule "
    "``rank(layer_name, p) -> int``; ``rank=0`` is Adam.",
  ),
}


def _bad(name: str, value: Any, must: str) -> ValueError:
  if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
    value = np.asarray(value)  # NumPy's repr: no weak_type, stable
  return ValueError(f"{name} must be {must}, got {name}={value!r}")


def validate(values: Mapping[str, Any], table: Mapping[str, Setting] = SETTINGS) -> None:
  """Every value in ``values`` that ``table`` describes; raises ``ValueError``
  naming the first bad one (and the pairs that must agree).

  Examples:
    >>> validate({"rank": 4, "stat_decay": 0.9})
    >>> validate({"include": "Dense"})
    Traceback (most recent call last):
    ...
    ValueError: include must be a list of regexes ... got include='Dense'
  """
  for name, setting in table.items():
    if name in values:
      must = setting.check(values[name])
      if must is not None:
        raise _bad(name, values[name], must)
  cov, inv = values.get("cov_update_every", 1), values.get("inv_update_every", 1)
  if inv % cov:
    raise ValueError(
      "inv_update_every must be a multiple of cov_update_every, got "
      f"inv_update_every={inv!r} and cov_update_every={cov!r}"
    )
  dtype = values.get("stats_dtype", "float32")
  if jnp.dtype(dtype).name == "float64" and not jax.config.read("jax_enable_x64"):
    raise ValueError(
      "stats_dtype='float64' needs 64-bit JAX: set "
      "jax.config.update('jax_enable_x64', True) first, got "
      f"stats_dtype={dtype!r}"
    )


def _model_input_axes(model: Any, input_axes: Any) -> dict[str, Any]:
  """``input_axes`` with the layouts of an NNX model's layers added (anchored
  regexes, before the user's entries, which win)."""
  from nysact_optax import _capture_nnx  # flax only when a model is given

  if not _capture_nnx.is_nnx(model) or not isinstance(model, _capture_nnx.nnx.Module):
    raise TypeError(
      f"model must be an nnx.Module (its layers' layouts are read from it), got "
      f"model={type(model).__name__}; for flax.linen models pass input_axes= "
      "where the error message asks for it"
    )
  found = {f"^{re.escape(name)}$": axes for name, axes in _capture_nnx.input_axes_of(model).items()}
  return {**found, **(input_axes or {})}


@dataclasses.dataclass(frozen=True)
class Options:
  """The statistics -> factors settings of one transformation, validated.

  Built once by a public function with :meth:`build`; read by
  :class:`nysact_optax._pipeline.Factors`. The settings only the inverse
  apply uses (``damping``, ``nystrom``, ``relative_damping``) and Adam's are
  not here: the transformation that uses them keeps them.

  Examples:
    >>> options = Options.build({"rank": 4, "stat_decay": 0.9})
    >>> options.rank, options.dtype, options.apply_precision
    (4, dtype('float32'), Precision.HIGHEST)
  """

  rank: _tree.RankRule = 10
  oversample: int = 0
  sketch: str = "gaussian"
  stat_decay: Any = 0.95
  cov_update_every: int = 5
  inv_update_every: int = 50
  seed: Any = 0
  sketch_refresh: str = "fixed"
  exclude: _tree.LayerFilter = ()
  include: _tree.LayerFilter | None = None
  input_axes: Mapping[str, int | Sequence[int]] | None = None
  stack_axes: Mapping[str, int] | None = None
  stats_dtype: Any = "float32"
  axis_name: str | tuple[str, ...] | None = None
  precision: Any = "highest"

  @classmethod
  def build(cls, values: Mapping[str, Any], table: Mapping[str, Setting] = SETTINGS) -> Options:
    """The options among ``values`` (a function's arguments, e.g. its
    ``locals()``), after :func:`validate`; an NNX ``model`` is read into
    ``input_axes``. Values that are not options are ignored."""
    validate(values, table)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in values.items() if k in fields}
    if values.get("model") is not None:
      kwargs["input_axes"] = _model_input_axes(values["model"], kwargs.get("input_axes"))
    return cls(**kwargs)

  @property
  def dtype(self) -> jnp.dtype:
    """The dtype of the statistics, the factors and the state."""
    return jnp.dtype(self.stats_dtype)

  @property
  def stats_precision(self) -> jax.lax.Precision:
    return resolve_precision(self.precision)[0]

  @property
  def apply_precision(self) -> jax.lax.Precision:
    return resolve_precision(self.precision)[1]


def forward(fn: Callable[..., Any], values: Mapping[str, Any]) -> dict[str, Any]:
  """The entries of ``values`` that ``fn`` takes as keyword arguments: an
  alias passes its settings on to its transformation with this.

  Examples:
    >>> forward(lambda *, rank, seed: None, {"rank": 3, "seed": 0, "momentum": 0.9})
    {'rank': 3, 'seed': 0}
  """
  params = inspect.signature(fn).parameters
  return {k: v for k, v in values.items() if k in params}


_ENTRY = re.compile(r"^(\w+):")


def documented(fn: Callable[..., Any] | None = None, *, table: Mapping[str, Setting] = SETTINGS):
  """Completes ``fn``'s ``Args:`` section from ``table``, in the order of its
  signature: every argument its docstring does not describe itself gets the
  table's entry. Returns ``fn`` (a decorator; ``table=`` makes one)."""
  if fn is None:
    return lambda f: documented(f, table=table)
  doc = inspect.cleandoc(fn.__doc__ or "")
  lines = doc.splitlines()
  start = lines.index("Args:")
  end = next(
    (i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith(" ")),
    len(lines),
  )
  while lines[end - 1] == "":
    end -= 1
  entries: dict[str, list[str]] = {}
  for line in lines[start + 1 : end]:
    match = _ENTRY.match(line[2:]) if line.startswith("  ") and line[2] != " " else None
    if match:
      entries[match.group(1)] = [line]
    else:
      entries[next(reversed(entries))].append(line)
  order = list(inspect.signature(fn).parameters)
  for name in order:
    if name not in entries and name in table:
      text = textwrap.wrap(
        f"{name}: {table[name].doc}", 78, subsequent_indent="  ", break_on_hyphens=False
      )
      entries[name] = ["  " + t for t in text]
  missing = [name for name in order if name not in entries]
  if missing:
    raise AssertionError(f"{fn.__qualname__}: no documentation for {missing}")
  ordered = [line for name in order for line in entries[name]]
  ordered += [line for name, e in entries.items() if name not in order for line in e]
  body = lines[: start + 1] + ordered + lines[end:]
  first, rest = body[0], "\n".join(body[1:])
  fn.__doc__ = first + "\n" + textwrap.indent(rest, "  ")
  return fn
