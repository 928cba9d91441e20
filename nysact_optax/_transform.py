"""NysAct as optax gradient transformations: ``scale_by_nysact`` and ``nysact``."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from nysact_optax import _distributed, _nystrom, _sketch, _statistics, _tree

__all__ = ["NysActLayerState", "ScaleByNysActState", "nysact", "scale_by_nysact"]

SKETCH_REFRESH = ("reference", "fixed")


class NysActLayerState(NamedTuple):
  """Nyström factors of one layer; ``p`` is its input width (+1 with a bias).

  Attributes:
    sketch_key: PRNG key of the layer's current sketch ``S`` (uint32[2]); the
      sketch itself is redrawn from it, never stored.
    cov: EMA of the sketched covariance ``A^T A S / n`` (p x r; p x p in
      exact mode).
    basis: orthonormal Nyström basis ``U`` (p x r; p x p in exact mode).
    eigvals: Nyström eigenvalues ``lam >= 0`` (r).
    failures: how many inverse refreshes produced non-finite factors and were
      discarded (the previous factors were kept).
  """

  sketch_key: jax.Array
  cov: jax.Array
  basis: jax.Array
  eigvals: jax.Array
  failures: jax.Array


class ScaleByNysActState(NamedTuple):
  """State of :func:`scale_by_nysact`.

  Attributes:
    count: number of updates so far (int32).
    stat_count: number of statistics updates so far, ``k`` in the bias
      correction ``1 - stat_decay^k`` (int32).
    layers: per-layer :class:`NysActLayerState`, keyed by layer path
      (e.g. ``"Block_0/Conv_1"``).
  """

  count: jax.Array
  stat_count: jax.Array
  layers: dict[str, NysActLayerState]


def _is_concrete(x: Any) -> bool:
  return isinstance(x, numbers.Number)


def _validate(rank, sketch, damping, stat_decay, cov_every, inv_every, refresh, nystrom):
  def bad(name, value, must):
    raise ValueError(f"{name} must be {must}, got {name}={value!r}")

  if not isinstance(rank, numbers.Integral) or rank < 1:
    bad("rank", rank, "an integer >= 1")
  if sketch not in _sketch.SKETCHES:
    bad("sketch", sketch, f"one of {_sketch.SKETCHES}")
  if refresh not in SKETCH_REFRESH:
    bad("sketch_refresh", refresh, f"one of {SKETCH_REFRESH}")
  if nystrom not in _nystrom.NYSTROM_METHODS:
    bad("nystrom", nystrom, f"one of {_nystrom.NYSTROM_METHODS}")
  if _is_concrete(damping) and not damping > 0:
    bad("damping", damping, "> 0")
  if _is_concrete(stat_decay) and not 0 <= stat_decay < 1:
    bad("stat_decay", stat_decay, "in [0, 1)")
  for name, value in (("cov_update_every", cov_every), ("inv_update_every", inv_every)):
    if not isinstance(value, numbers.Integral) or value < 1:
      bad(name, value, "an integer >= 1")
  if inv_every % cov_every:
    raise ValueError(
        "inv_update_every must be a multiple of cov_update_every, got "
        f"inv_update_every={inv_every!r} and cov_update_every={cov_every!r}"
    )


def statistics_sketch_key(layer_state: NysActLayerState, sketch_refresh: str) -> jax.Array:
  """The key of the sketch the next statistics update of a layer uses."""
  exact = layer_state.cov.shape[1] >= layer_state.cov.shape[0]
  if sketch_refresh == "reference" and not exact:
    return jax.random.fold_in(layer_state.sketch_key, 1)
  return layer_state.sketch_key


def _periodic(count, every, fn, operand):
  """``fn(operand)`` when ``count % every == 0``, else ``operand``; one compile."""
  if every == 1:
    return fn(operand)
  return lax.cond(count % every == 0, fn, lambda x: x, operand)


def scale_by_nysact(
    *,
    rank: int = 10,
    sketch: str = "gaussian",
    damping: float = 1.0,
    stat_decay: float = 0.95,
    cov_update_every: int = 5,
    inv_update_every: int = 50,
    seed: int = 0,
    sketch_refresh: str = "reference",
    nystrom: str = "shifted",
    exclude: _tree.LayerFilter = (),
    input_axes: Mapping[str, int] | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions each layer's gradient with a Nyström-approximated FOOF inverse.

  For a layer with input rows ``A`` (n x p, with a constant 1 appended when it
  has a bias) and gradient ``G`` (o x p, kernel and bias), NysAct keeps a
  rank-``r`` Nyström approximation ``U diag(lam) U^T`` of the EMA of the
  activation covariance ``A^T A / n`` and returns ``G P`` with

  .. math::
    P = U \operatorname{diag}(1/(\lambda + \rho)) U^\top + (I - U U^\top)/\rho.

  Statistics ``Y = A^T A S / n`` (``S`` a p x r sketch) enter an EMA every
  ``cov_update_every`` steps; the factors are refreshed every
  ``inv_update_every`` steps; both at step 0. When ``rank >= p`` the layer
  uses the exact damped inverse ``(A_ema + rho I)^{-1}`` (FOOF). Parameters
  that are not the kernel or bias of a layer pass through unchanged.

  Args:
    rank: sketch width ``r`` (capped at each layer's ``p``).
    sketch: ``"gaussian"`` (i.i.d. ``N(0, 1/p)``) or ``"subcolumns"``.
    damping: ``rho > 0``; also the eigenvalue shift of the paper's method.
    stat_decay: EMA factor ``beta`` in ``[0, 1)``, bias-corrected.
    cov_update_every: statistics period ``T_cov``.
    inv_update_every: factor-refresh period ``T_inv``, a multiple of
      ``T_cov``.
    seed: seed of the sketches.
    sketch_refresh: ``"reference"`` draws a new sketch at every statistics
      update, as the authors' code does; ``"fixed"`` keeps one sketch per
      layer, so the EMA is exactly ``A_ema S`` (streaming Nyström).
    nystrom: ``"shifted"``, the paper's factorisation of ``A + rho I``
      shifted by ``|lambda_min| + rho``; or ``"stable"``, the stable Nyström
      approximation of ``A`` (Tropp et al. 2017) with a Gaussian sketch
      orthonormalised by QR.
    exclude: regexes (searched in the layer path) or a predicate on the path
      of layers whose gradients pass through unchanged.
    input_axes: ``{path regex: n}`` for kernels whose leading ``n`` axes meet
      the input, where the default rule (all but the bias's axes, or all but
      the last without a bias) is wrong, e.g. a bias-free
      ``DenseGeneral(features=(heads, dim))``.
    axis_name: under ``pmap``/``shard_map``, the mapped axis over which the
      sketched statistics are averaged (``lax.pmean``) before they enter the
      EMA, so every replica holds the same factors. Gradients are not
      averaged here: ``pmean`` them yourself, as with any optax optimizer.
      Not needed under ``jit`` with sharded arrays.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    keyword ``activations`` from :func:`nysact_optax.capture_activations`,
    or instead ``statistics`` from :func:`nysact_optax.sketched_statistics`
    (accumulated over micro-batches).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import nysact_optax
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((4, 5))
    >>> params = model.init(jax.random.PRNGKey(0), x)["params"]
    >>> tx = nysact_optax.scale_by_nysact(rank=2)
    >>> state = tx.init(params)
    >>> state.layers[""].basis.shape
    (6, 2)
    >>> apply = nysact_optax.capture_activations(model.apply)
    >>> def loss(p):
    ...   y, acts = apply({"params": p}, x)
    ...   return jnp.sum(y ** 2), acts
    >>> (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(params)
    >>> updates, state = tx.update(grads, state, params, activations=acts)
    >>> int(state.count), updates["kernel"].shape
    (1, (5, 3))

  References:
    Seung, Lee, Ko, "NysAct: A Scalable Preconditioned Gradient Descent using
    Nyström Approximation", IEEE BigData 2024; arXiv:2506.08360.
  """
  _validate(rank, sketch, damping, stat_decay, cov_update_every,
            inv_update_every, sketch_refresh, nystrom)
  factorise = {
      "shifted": _nystrom.nystrom_shifted,
      "stable": _nystrom.nystrom_stable,
  }[nystrom]

  def layers_of(tree):
    return _tree.find_layers(tree, rank=rank, exclude=exclude, input_axes=input_axes)

  def init_fn(params):
    base = jax.random.PRNGKey(seed)
    layers = {}
    for i, layer in enumerate(layers_of(params)):
      p, r = layer.p, layer.rank
      layers[layer.name] = NysActLayerState(
          sketch_key=jax.random.fold_in(base, i),
          cov=jnp.zeros((p, r), jnp.float32),
          basis=jnp.zeros((p, r), jnp.float32),
          eigvals=jnp.zeros((r,), jnp.float32),
          failures=jnp.zeros([], jnp.int32),
      )
    return ScaleByNysActState(
        count=jnp.zeros([], jnp.int32),
        stat_count=jnp.zeros([], jnp.int32),
        layers=layers,
    )

  def draw(layer, key):
    return _sketch.draw_sketch(
        key, layer.p, layer.rank, sketch, orthonormal=nystrom == "stable"
    )

  def update_fn(updates, state, params=None, *, activations=None,
                statistics=None, **extra_args):
    del params, extra_args
    layers = layers_of(updates)
    if set(state.layers) != {layer.name for layer in layers}:
      raise ValueError(
          "the state's layers do not match the updates' layers: state has "
          f"{sorted(state.layers)}, updates have {[l.name for l in layers]}"
      )
    if statistics is None:
      inputs = _check_activations(layers, activations, exclude)
    elif activations is not None:
      raise ValueError(
          "scale_by_nysact.update got both activations= and statistics=: pass "
          "statistics= (from nysact_optax.sketched_statistics) when "
          "accumulating micro-batches, activations= otherwise"
      )
    else:
      _check_statistics(layers, statistics)

    def update_statistics(layer_states):
      new = dict(layer_states)
      for layer in layers:
        with jax.named_scope(f"nysact/statistics/{layer.name}"):
          ls = layer_states[layer.name]
          key = statistics_sketch_key(ls, sketch_refresh)
          if statistics is None:
            y = _statistics.sketched_covariance(
                inputs[layer.name], draw(layer, key), layer.has_bias
            )
          else:
            y = jnp.asarray(statistics[layer.name], jnp.float32)
          y = _distributed.replicate(y)  # factors stay replicated on a mesh
          if axis_name is not None:
            y = lax.pmean(y, axis_name)
          cov = stat_decay * ls.cov + (1.0 - stat_decay) * y
          new[layer.name] = ls._replace(sketch_key=key, cov=cov)
      return new

    do_stats = state.count % cov_update_every == 0
    layer_states = _periodic(state.count, cov_update_every, update_statistics, state.layers)
    stat_count = state.stat_count + do_stats.astype(jnp.int32)
    correction = 1.0 - jnp.asarray(stat_decay, jnp.float32) ** stat_count

    def refresh(layer_states):
      new = dict(layer_states)
      for layer in layers:
        with jax.named_scope(f"nysact/factors/{layer.name}"):
          ls = layer_states[layer.name]
          c_hat = ls.cov / correction
          if layer.exact:
            u, lam = _nystrom.exact_eigh(c_hat)
          else:
            u, lam = factorise(c_hat, draw(layer, ls.sketch_key).matrix, damping)
          ok = jnp.isfinite(u).all() & jnp.isfinite(lam).all()
          new[layer.name] = ls._replace(
              basis=jnp.where(ok, u, ls.basis),
              eigvals=jnp.where(ok, lam, ls.eigvals),
              failures=ls.failures + (~ok).astype(jnp.int32),
          )
      return new

    layer_states = _periodic(state.count, inv_update_every, refresh, layer_states)

    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    position = {tuple(path): i for i, (path, _) in enumerate(flat)}
    leaves = [leaf for _, leaf in flat]
    for layer in layers:
      with jax.named_scope(f"nysact/apply/{layer.name}"):
        ls = layer_states[layer.name]
        kernel = leaves[position[layer.kernel_path]]
        g = kernel.reshape(layer.p_in, layer.out).astype(jnp.float32)
        if layer.has_bias:
          bias = leaves[position[layer.bias_path]]
          g = jnp.concatenate([g, bias.reshape(1, layer.out).astype(jnp.float32)])
        pg = _nystrom.precondition(g, ls.basis, ls.eigvals, damping)
        leaves[position[layer.kernel_path]] = (
            pg[: layer.p_in].reshape(kernel.shape).astype(kernel.dtype)
        )
        if layer.has_bias:
          leaves[position[layer.bias_path]] = (
              pg[layer.p_in].reshape(bias.shape).astype(bias.dtype)
          )
    updates = jax.tree_util.tree_unflatten(treedef, leaves)
    new_state = ScaleByNysActState(
        count=optax.safe_increment(state.count),
        stat_count=stat_count,
        layers=layer_states,
    )
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_statistics(layers, statistics):
  """Precomputed statistics must cover exactly the layers, with ``(p, r)`` shapes."""
  names = {layer.name for layer in layers}
  if not isinstance(statistics, Mapping) or set(statistics) != names:
    got = sorted(statistics) if isinstance(statistics, Mapping) else type(statistics).__name__
    raise ValueError(
        f"statistics must map every layer to its sketched covariance: expected "
        f"layers {sorted(names)}, got {got}. Compute them with "
        "nysact_optax.sketched_statistics(opt_state, activations)."
    )
  for layer in layers:
    shape = tuple(jnp.shape(statistics[layer.name]))
    if shape != (layer.p, layer.rank):
      raise ValueError(
          f"layer {layer.name!r}: statistics has shape {shape}, expected "
          f"{(layer.p, layer.rank)} (p, rank). Compute them with "
          "nysact_optax.sketched_statistics from this optimizer's state."
      )


def _check_activations(layers, activations, exclude):
  """The captured inputs of every layer, checked against the kernels."""
  if activations is None:
    if not layers:
      return {}
    raise ValueError(
        "scale_by_nysact.update needs activations=...: wrap your model's apply "
        "with nysact_optax.capture_activations and pass the activations it "
        f"returns (layers expecting them: {[l.name for l in layers]})"
    )
  table = _tree.activation_table(activations)
  known = {layer.name for layer in layers}
  for name in table:
    if name not in known and not _tree._matches(name, exclude):
      raise ValueError(
          f"activations were captured for layer {name!r}, which has no kernel "
          f"in the updates tree (layers there: {sorted(known)}). Pass the "
          "params tree of the same model (variables['params'])."
      )
  for layer in layers:
    if layer.name not in table:
      raise ValueError(
          f"no activations were captured for layer {layer.name!r} (kernel "
          f"{layer.kernel_shape}). Capture them with "
          "nysact_optax.capture_activations, or exclude the layer with "
          f"exclude=[{layer.name!r}]."
      )
    entry = table[layer.name]
    for x in entry.inputs:
      width = entry.spec.input_width(x.shape)
      if width != layer.p_in or entry.spec.num_input_axes != layer.num_input_axes:
        raise ValueError(
            f"layer {layer.name!r}: its input of shape {tuple(x.shape)} meets "
            f"{entry.spec.num_input_axes} kernel axes ({width} features), but "
            f"the kernel {layer.kernel_shape} was taken to have "
            f"{layer.num_input_axes} input axes ({layer.p_in} features). If the "
            f"kernel layout is unusual, pass input_axes={{{layer.name!r}: "
            f"{entry.spec.num_input_axes}}}."
        )
  return table


def nysact(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    rank: int = 10,
    sketch: str = "gaussian",
    damping: float = 1.0,
    stat_decay: float = 0.95,
    cov_update_every: int = 5,
    inv_update_every: int = 50,
    seed: int = 0,
    sketch_refresh: str = "reference",
    nystrom: str = "shifted",
    exclude: _tree.LayerFilter = (),
    input_axes: Mapping[str, int] | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """The NysAct optimizer: precondition, weight decay, heavy-ball momentum, step.

  ``optax.chain(scale_by_nysact(...), add_decayed_weights(weight_decay),
  trace(momentum, nesterov), scale_by_learning_rate(learning_rate))``, the
  order of the authors' code: weight decay is added after preconditioning
  and is not preconditioned.

  Args:
    learning_rate: a float or an optax schedule.
    momentum: heavy-ball momentum (PyTorch style, ``m = mu m + d``).
    nesterov: use Nesterov momentum.
    weight_decay: coefficient of ``params`` added to the preconditioned
      gradient.
    rank, sketch, damping, stat_decay, cov_update_every, inv_update_every,
    seed, sketch_refresh, nystrom, exclude, input_axes, axis_name: see
      :func:`scale_by_nysact`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; pass ``activations=`` to
    its ``update``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import nysact_optax
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((4, 3))
    >>> params = model.init(jax.random.PRNGKey(0), x)["params"]
    >>> tx = nysact_optax.nysact(0.1, weight_decay=5e-4)
    >>> opt_state = tx.init(params)
    >>> apply = nysact_optax.capture_activations(model.apply)
    >>> def loss(p):
    ...   y, acts = apply({"params": p}, x)
    ...   return jnp.mean(y ** 2), acts
    >>> (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(params)
    >>> updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    >>> params = optax.apply_updates(params, updates)
  """
  parts = [
      scale_by_nysact(
          rank=rank, sketch=sketch, damping=damping, stat_decay=stat_decay,
          cov_update_every=cov_update_every, inv_update_every=inv_update_every,
          seed=seed, sketch_refresh=sketch_refresh, nystrom=nystrom,
          exclude=exclude, input_axes=input_axes, axis_name=axis_name,
      )
  ]
  if not (_is_concrete(weight_decay) and weight_decay == 0):
    parts.append(optax.add_decayed_weights(weight_decay))
  if not (_is_concrete(momentum) and momentum == 0):
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)
