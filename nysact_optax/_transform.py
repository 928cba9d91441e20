"""NysAct's preconditioner as an optax gradient transformation: ``scale_by_nysact``."""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from nysact_optax import _distributed, _layers, _nystrom, _sketch, _statistics, _tree

__all__ = ["NysActLayerState", "ScaleByNysActState", "scale_by_nysact"]

SKETCH_REFRESH = ("fixed", "reference")
STATS_DTYPES = ("float32", "float64")


class NysActLayerState(NamedTuple):
  """Nyström factors of one layer; ``p`` is its input width (+1 with a bias).

  A layer stacked by ``nn.scan``/``nn.vmap`` (``stack_axes``) has one set of
  factors per copy: every field gets the kernel's stack axes first.

  Attributes:
    sketch_key: PRNG key of the layer's current sketch ``S`` (uint32[2]); the
      sketch itself is redrawn from it, never stored.
    cov: EMA of the sketched covariance ``A^T A S / n`` (p x r; p x p in
      exact mode).
    basis: orthonormal Nyström basis ``U`` (p x r; p x p in exact mode).
    eigvals: Nyström eigenvalues ``lam >= 0`` (r).
    failures: how many inverse refreshes produced non-finite factors and were
      discarded (the previous factors were kept).
    stat_skips: how many statistics updates were skipped because the layer's
      new statistics were non-finite (non-finite activations, or overflow);
      the bias-corrected covariance and the sketch were left as they were.

  Examples:
    >>> import jax, jax.numpy as jnp, nysact_optax
    >>> tx = nysact_optax.scale_by_nysact(rank=2)
    >>> state = tx.init({"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}})
    >>> jax.tree.map(jnp.shape, state.layers["dense"])  # p = 4 inputs + 1 for the bias
    NysActLayerState(sketch_key=(2,), cov=(5, 2), basis=(5, 2), eigvals=(2,),
                     failures=(), stat_skips=())
  """

  sketch_key: jax.Array
  cov: jax.Array
  basis: jax.Array
  eigvals: jax.Array
  failures: jax.Array
  stat_skips: jax.Array


class ScaleByNysActState(NamedTuple):
  """State of :func:`scale_by_nysact`.

  Attributes:
    count: number of updates so far (int32).
    stat_count: number of statistics updates so far, ``k`` in the bias
      correction ``1 - stat_decay^k`` (int32).
    layers: per-layer :class:`NysActLayerState`, keyed by layer path
      (e.g. ``"Block_0/Conv_1"``).

  Examples:
    >>> import jax.numpy as jnp, nysact_optax
    >>> state = nysact_optax.scale_by_nysact().init({"dense": {"kernel": jnp.ones((4, 3))}})
    >>> int(state.count), int(state.stat_count), list(state.layers)
    (0, 0, ['dense'])
    >>> opt_state = nysact_optax.nysact(0.1).init({"dense": {"kernel": jnp.ones((4, 3))}})
    >>> type(nysact_optax.find_nysact_state(opt_state)).__name__  # inside the chain
    'ScaleByNysActState'
  """

  count: jax.Array
  stat_count: jax.Array
  layers: dict[str, NysActLayerState]


def _known_now(x: Any) -> Any:
  """``x`` as a NumPy value when it is known at construction, else ``None``.

  Numbers and concrete arrays are known; tracers (values injected by
  ``optax.inject_hyperparams`` under ``jit``) cannot be checked here.
  """
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _validate(rank, sketch, damping, stat_decay, cov_every, inv_every, refresh,
              nystrom, seed=0, exclude=(), input_axes=None, stats_dtype="float32"):
  def bad(name, value, must):
    if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
      value = np.asarray(value)  # NumPy's repr: no weak_type, stable
    raise ValueError(f"{name} must be {must}, got {name}={value!r}")

  static = ("rank", rank), ("cov_update_every", cov_every), ("inv_update_every", inv_every)
  for name, value in static:
    if isinstance(value, (jax.Array, np.ndarray)):
      bad(name, value, "a Python int, not an array: it fixes shapes or the "
          "schedule, so it is static (with optax.inject_hyperparams, list it "
          "in static_args)")
  if not callable(rank) and (not isinstance(rank, numbers.Integral) or rank < 1):
    bad("rank", rank, "an integer >= 1")  # or a rule rank(layer_name, p) -> int
  try:
    dtype_name = jnp.dtype(stats_dtype).name
  except TypeError:
    dtype_name = None
  if dtype_name not in STATS_DTYPES:
    bad("stats_dtype", stats_dtype, f"one of {STATS_DTYPES}")
  if dtype_name == "float64" and not jax.config.jax_enable_x64:
    raise ValueError(
        "stats_dtype='float64' needs 64-bit JAX: set "
        "jax.config.update('jax_enable_x64', True) first, got "
        f"stats_dtype={stats_dtype!r}"
    )
  if sketch not in _sketch.SKETCHES:
    bad("sketch", sketch, f"one of {_sketch.SKETCHES}")
  if refresh not in SKETCH_REFRESH:
    bad("sketch_refresh", refresh, f"one of {SKETCH_REFRESH}")
  if nystrom not in _nystrom.NYSTROM_METHODS:
    bad("nystrom", nystrom, f"one of {_nystrom.NYSTROM_METHODS}")
  for name, value in (("damping", damping), ("stat_decay", stat_decay)):
    known = _known_now(value)
    if known is not None and (known.ndim or not np.issubdtype(known.dtype, np.number)):
      bad(name, value, "a real scalar")
  known = _known_now(damping)
  if known is not None and not np.isfinite(known):
    bad("damping", damping, "finite and > 0")
  if known is not None and not known > 0:
    bad("damping", damping, "> 0")
  known = _known_now(stat_decay)
  if known is not None and not 0 <= known < 1:
    bad("stat_decay", stat_decay, "in [0, 1)")
  for name, value in (("cov_update_every", cov_every), ("inv_update_every", inv_every)):
    if not isinstance(value, numbers.Integral) or value < 1:
      bad(name, value, "an integer >= 1")
  if inv_every % cov_every:
    raise ValueError(
        "inv_update_every must be a multiple of cov_update_every, got "
        f"inv_update_every={inv_every!r} and cov_update_every={cov_every!r}"
    )
  known = _known_now(seed)
  if known is not None and (known.ndim or not np.issubdtype(known.dtype, np.integer)):
    bad("seed", seed, "an integer")
  if not callable(exclude) and (
      isinstance(exclude, str)
      or not isinstance(exclude, Collection)
      or not all(isinstance(e, str) for e in exclude)
  ):
    bad("exclude", exclude, "a list of regexes or a predicate on layer paths "
        "(a str would be read as one pattern per letter: write "
        "exclude=['...'])")
  def axes_ok(v):
    if isinstance(v, (tuple, list)):
      return all(axes_ok(a) for a in v)
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)

  if input_axes is not None and not (
      isinstance(input_axes, Mapping)
      and all(isinstance(k, str) and axes_ok(v) for k, v in input_axes.items())
  ):
    bad("input_axes", input_axes, "a mapping from layer-path regexes to an "
        "integer or a tuple of kernel axes, e.g. input_axes={'query': 1}")


def statistics_sketch_key(layer_state: NysActLayerState, sketch_refresh: str) -> jax.Array:
  """The key of the sketch the next statistics update of a layer uses."""
  exact = layer_state.cov.shape[-1] >= layer_state.cov.shape[-2]
  key = layer_state.sketch_key
  if sketch_refresh == "reference" and not exact:
    flat = key.reshape(-1, key.shape[-1])  # one key per stacked copy
    return jax.vmap(lambda k: jax.random.fold_in(k, 1))(flat).reshape(key.shape)
  return key


def _periodic(count, every, fn, operand):
  """``fn(operand)`` when ``count % every == 0``, else ``operand``; one compile."""
  if every == 1:
    return fn(operand)
  return lax.cond(count % every == 0, fn, lambda x: x, operand)


def _over_stack(layer: _tree.Layer, fn, *args):
  """``fn`` on one copy of the layer, vmapped over its stack axes, if any.

  Every array in ``args`` has the layer's stack axes first.
  """
  if not layer.stack_axes:
    return fn(*args)
  n, size = layer.stack_axes, math.prod(layer.stack_shape)
  flat = jax.tree.map(lambda a: a.reshape((size,) + a.shape[n:]), args)
  out = jax.vmap(fn)(*flat)
  return jax.tree.map(lambda a: a.reshape(layer.stack_shape + a.shape[1:]), out)


def _permutations(layer: _tree.Layer, bias_perm):
  """Transpositions of the kernel to ``(*stack, *inputs, *outputs)`` and of
  the bias to ``(*stack, *outputs)`` in kernel order."""
  s = layer.stack_axes
  stack = tuple(range(s))
  kperm = stack + tuple(s + a for a in layer.input_axes + layer.output_axes)
  bias_perm = bias_perm or tuple(range(len(layer.output_axes)))
  return kperm, stack + tuple(s + a for a in bias_perm)


def _to_matrix(layer, kernel, bias, bias_perm, dtype):
  """The gradient matrix ``(*stack, p, o)``: kernel rows, then the bias row."""
  kperm, bperm = _permutations(layer, bias_perm)
  g = jnp.transpose(kernel, kperm).reshape(layer.stack_shape + (layer.p_in, layer.out))
  g = g.astype(dtype)
  if bias is not None:
    b = jnp.transpose(bias, bperm).reshape(layer.stack_shape + (1, layer.out))
    g = jnp.concatenate([g, b.astype(dtype)], axis=-2)
  return g


def _from_matrix(layer, pg, kernel, bias, bias_perm):
  """Inverse of :func:`_to_matrix`, in the kernel's and bias's dtypes."""
  kperm, bperm = _permutations(layer, bias_perm)
  k = pg[..., : layer.p_in, :].reshape(tuple(kernel.shape[i] for i in kperm))
  k = jnp.transpose(k, tuple(np.argsort(kperm))).astype(kernel.dtype)
  if bias is None:
    return k, None
  b = pg[..., layer.p_in, :].reshape(tuple(bias.shape[i] for i in bperm))
  return k, jnp.transpose(b, tuple(np.argsort(bperm))).astype(bias.dtype)


def scale_by_nysact(
    *,
    rank: _tree.RankRule = 10,
    sketch: str = "gaussian",
    damping: float = 1.0,
    stat_decay: float = 0.95,
    cov_update_every: int = 5,
    inv_update_every: int = 50,
    seed: int = 0,
    sketch_refresh: str = "fixed",
    nystrom: str = "stable",
    exclude: _tree.LayerFilter = (),
    input_axes: Mapping[str, int | Sequence[int]] | None = None,
    include: _tree.LayerFilter | None = None,
    stack_axes: Mapping[str, int] | None = None,
    stats_dtype: Any = "float32",
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

  Non-finite values never enter the state: a layer whose new statistics are
  non-finite skips that update (counted in ``stat_skips``), and a refresh
  with non-finite factors keeps the previous ones (counted in ``failures``);
  see :func:`nysact_optax.diagnostics`. A non-finite gradient gives a
  non-finite update, which ``optax.apply_if_finite`` can skip.

  Args:
    rank: sketch width ``r``, or a rule ``rank(layer_name, p) -> int``; capped
      at each layer's ``p``.
    sketch: ``"gaussian"`` (i.i.d. ``N(0, 1/p)``) or ``"subcolumns"``.
    damping: ``rho > 0``; also the eigenvalue shift of the paper's method.
    stat_decay: EMA factor ``beta`` in ``[0, 1)``, bias-corrected.
    cov_update_every: statistics period ``T_cov``.
    inv_update_every: factor-refresh period ``T_inv``, a multiple of
      ``T_cov``.
    seed: seed of the sketches.
    sketch_refresh: ``"fixed"`` (default) keeps one sketch per layer, so
      the EMA is exactly ``A_ema S`` (streaming Nyström); ``"reference"``
      draws a new sketch at every statistics update, as the authors' code
      does. ``"fixed"`` was higher in 9 of 11 paired seeds of the
      Fashion-MNIST CNN study (test: 83.1 +- 1.3 % against 82.1 +- 1.8 %,
      5 seeds; ``benchmarks/quality/README.md``).
    nystrom: ``"stable"`` (default), the stable Nyström approximation of
      ``A`` (Tropp et al. 2017; a Gaussian sketch is orthonormalised); or
      ``"shifted"``, the paper's factorisation of ``A + rho I`` shifted by
      ``|lambda_min| + rho``, whose eigenvalues come out below the
      covariance's (all 0 when ``rho`` is comparable to them, so that
      ``P = I / rho``). ``"stable"`` gave 83.0 +- 0.6 % against 79.9 +- 0.7 %
      validation accuracy on a Fashion-MNIST CNN (3 seeds each;
      ``benchmarks/quality/README.md``).
    exclude: regexes (searched in the layer path) or a predicate on the path
      of layers whose gradients pass through unchanged.
    input_axes: ``{path regex: n}`` for kernels whose leading ``n`` axes meet
      the input, where the default rule (all but the bias's axes, or all but
      the last without a bias) is wrong, e.g. a bias-free
      ``DenseGeneral(features=(heads, dim))``; or ``{path regex: (axes...)}``
      when the input axes are not leading (``nn.Einsum("btd,ndh->btnh")``).
    include: if given, regexes or a predicate: only layers it matches (and
      ``exclude`` does not) are preconditioned; the rest pass through.
    stack_axes: ``{path regex: n}`` for layers whose kernels carry ``n``
      leading axes of stacked copies (``nn.scan``/``nn.vmap`` over params);
      each copy gets its own statistics and factors.
    stats_dtype: dtype of the statistics, the factorisations and the state,
      ``"float32"`` (default) or ``"float64"`` (needs ``jax_enable_x64``).
      Activations and gradients of any float dtype (bf16, fp16) are cast to
      it; updates come back in the gradient's dtype.
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
            inv_update_every, sketch_refresh, nystrom, seed, exclude, input_axes,
            stats_dtype)
  factorise = {
      "shifted": _nystrom.nystrom_shifted,
      "stable": _nystrom.nystrom_stable,
  }[nystrom]
  dtype = jnp.dtype(stats_dtype)

  def layers_of(tree):
    return _tree.find_layers(tree, rank=rank, exclude=exclude, input_axes=input_axes,
                             include=include, stack_axes=stack_axes)

  def init_fn(params):
    base = jax.random.PRNGKey(seed)
    layers = {}
    for i, layer in enumerate(layers_of(params)):
      p, r, stack = layer.p, layer.rank, layer.stack_shape
      key = jax.random.fold_in(base, i)
      if stack:  # one sketch per stacked copy
        key = jax.random.split(key, math.prod(stack)).reshape(stack + key.shape)
      layers[layer.name] = NysActLayerState(
          sketch_key=key,
          cov=jnp.zeros(stack + (p, r), dtype),
          basis=jnp.zeros(stack + (p, r), dtype),
          eigvals=jnp.zeros(stack + (r,), dtype),
          failures=jnp.zeros(stack, jnp.int32),
          stat_skips=jnp.zeros(stack, jnp.int32),
      )
    return ScaleByNysActState(
        count=jnp.zeros([], jnp.int32),
        stat_count=jnp.zeros([], jnp.int32),
        layers=layers,
    )

  def draw(layer, key):
    return _sketch.draw_sketch(
        key, layer.p, layer.rank, sketch, orthonormal=nystrom == "stable", dtype=dtype
    )

  def update_fn(updates, state, params=None, *, activations=None,
                statistics=None, **extra_args):
    del params, extra_args
    layers = layers_of(updates)
    _check_state(layers, state)
    if statistics is None:
      inputs = _check_activations(layers, activations, include, exclude)
    elif activations is not None:
      raise ValueError(
          "scale_by_nysact.update got both activations= and statistics=: pass "
          "statistics= (from nysact_optax.sketched_statistics) when "
          "accumulating micro-batches, activations= otherwise"
      )
    else:
      _check_statistics(layers, statistics)
      inputs = {}

    # A layer whose new statistics are non-finite skips the update: its EMA is
    # rescaled by (1 - beta^(k+1)) / (1 - beta^k), which leaves the
    # bias-corrected estimate C / (1 - beta^k) exactly as it was.
    beta = jnp.asarray(stat_decay, jnp.float32)
    had_stats = state.stat_count > 0
    keep_scale = jnp.where(
        had_stats,
        (1.0 - beta ** (state.stat_count + 1))
        / jnp.where(had_stats, 1.0 - beta**state.stat_count, 1.0),
        1.0,
    )

    def update_statistics(layer_states):
      new = dict(layer_states)
      for layer in layers:
        with jax.named_scope(f"nysact/statistics/{layer.name}"):
          ls = layer_states[layer.name]
          if statistics is None:

            def one(key, layer_inputs, layer=layer):
              if sketch_refresh == "reference" and not layer.exact:
                key = jax.random.fold_in(key, 1)
              y = _statistics.sketched_covariance(
                  layer_inputs, draw(layer, key), layer.has_bias, dtype
              )
              return key, y

            key, y = _over_stack(layer, one, ls.sketch_key, inputs[layer.name])
          else:
            key = statistics_sketch_key(ls, sketch_refresh)
            y = jnp.asarray(statistics[layer.name], dtype)
          y = _distributed.replicate(y)  # factors stay replicated on a mesh
          if axis_name is not None:
            y = lax.pmean(y, axis_name)
          cov = (stat_decay * ls.cov + (1.0 - stat_decay) * y).astype(dtype)
          ok = jnp.isfinite(cov).all((-2, -1))  # per stacked copy
          new[layer.name] = ls._replace(
              sketch_key=jnp.where(ok[..., None], key, ls.sketch_key),
              cov=jnp.where(ok[..., None, None], cov, (keep_scale * ls.cov).astype(dtype)),
              stat_skips=ls.stat_skips + (~ok).astype(jnp.int32),
          )
      return new

    do_stats = state.count % cov_update_every == 0
    layer_states = _periodic(state.count, cov_update_every, update_statistics, state.layers)
    stat_count = state.stat_count + do_stats.astype(jnp.int32)
    correction = 1.0 - jnp.asarray(stat_decay, dtype) ** stat_count

    def refresh(layer_states):
      new = dict(layer_states)
      for layer in layers:
        with jax.named_scope(f"nysact/factors/{layer.name}"):
          ls = layer_states[layer.name]

          def one(cov, key, layer=layer):
            c_hat = cov / correction
            if layer.exact:
              return _nystrom.exact_eigh(c_hat)
            return factorise(c_hat, draw(layer, key).matrix, damping)

          u, lam = _over_stack(layer, one, ls.cov, ls.sketch_key)
          ok = jnp.isfinite(u).all((-2, -1)) & jnp.isfinite(lam).all(-1)  # per copy
          new[layer.name] = ls._replace(
              basis=jnp.where(ok[..., None, None], u, ls.basis).astype(dtype),
              eigvals=jnp.where(ok[..., None], lam, ls.eigvals).astype(dtype),
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
        bias = leaves[position[layer.bias_path]] if layer.has_bias else None
        # With statistics= (micro-batch accumulation) no specs arrive: einsum
        # layers whose bias is stored in another order than the kernel's
        # outputs are not supported there (documented in sketched_statistics).
        entry = inputs.get(layer.name)
        bias_perm = getattr(entry.spec, "bias_perm", None) if entry else None
        g = _to_matrix(layer, kernel, bias, bias_perm, dtype)
        pg = _over_stack(
            layer, lambda g, u, lam: _nystrom.precondition(g, u, lam, damping),
            g, ls.basis, ls.eigvals,
        )
        kernel, bias = _from_matrix(layer, pg, kernel, bias, bias_perm)
        leaves[position[layer.kernel_path]] = kernel
        if layer.has_bias:
          leaves[position[layer.bias_path]] = bias
    updates = jax.tree_util.tree_unflatten(treedef, leaves)
    new_state = ScaleByNysActState(
        count=optax.safe_increment(state.count),
        stat_count=stat_count,
        layers=layer_states,
    )
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_state(layers, state):
  """The state was made by ``init`` on a tree with these layers and shapes."""
  names = [layer.name for layer in layers]
  if set(state.layers) != set(names):
    raise ValueError(
        "the optimizer state does not match the updates: the state was "
        f"initialised for layers {sorted(state.layers)}, the updates have "
        f"layers {names} (only in the state: "
        f"{sorted(set(state.layers) - set(names))}; only in the updates: "
        f"{sorted(set(names) - set(state.layers))}). Call init on the params "
        "tree you update, with the same exclude= and input_axes=."
    )
  for layer in layers:
    shape = tuple(state.layers[layer.name].cov.shape)
    if shape != layer.stack_shape + (layer.p, layer.rank):
      raise ValueError(
          f"layer {layer.name!r}: the optimizer state holds statistics of "
          f"shape {shape}, but its kernel {layer.kernel_shape}"
          f"{' with bias' if layer.has_bias else ''} needs "
          f"{layer.stack_shape + (layer.p, layer.rank)}. Call init on the params tree you update."
      )


def _axes_hint(axes: tuple[int, ...]) -> int | tuple[int, ...]:
  return len(axes) if axes == tuple(range(len(axes))) else axes


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
    if shape != layer.stack_shape + (layer.p, layer.rank):
      raise ValueError(
          f"layer {layer.name!r}: statistics has shape {shape}, expected "
          f"{layer.stack_shape + (layer.p, layer.rank)} (p, rank). Compute them with "
          "nysact_optax.sketched_statistics from this optimizer's state."
      )


def _check_activations(layers, activations, include, exclude):
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
    if name not in known and _tree.selected(name, include, exclude):
      raise ValueError(
          f"activations were captured for layer {name!r}, which has no kernel "
          f"in the updates tree (layers there: {sorted(known)}). Pass the "
          "params tree of the same model (variables['params'])."
      )
  for layer in layers:
    if layer.name not in table:
      raise ValueError(
          f"no activations were captured for layer {layer.name!r} (kernel "
          f"{layer.kernel_shape}); activations hold layers {sorted(table)}. "
          "Capture them with nysact_optax.capture_activations, or exclude the "
          f"layer with exclude=[{layer.name!r}]."
      )
    entry = table[layer.name]
    if isinstance(entry.spec, _layers.Unsupported):
      raise NotImplementedError(
          f"layer {layer.name!r}: {entry.spec.reason}; NysAct cannot "
          f"precondition it: exclude it with exclude=[{layer.name!r}]"
      )
    if not entry.inputs:
      raise ValueError(
          f"layer {layer.name!r} ran, but its inputs were not captured: a lifted "
          "transform (nn.scan, nn.vmap) dropped the 'nysact_inputs' collection. "
          "List it beside 'params' in the transform, e.g. nn.scan(..., "
          "variable_axes={'params': 0, 'nysact_inputs': 0}), or exclude the "
          f"layer with exclude=[{layer.name!r}]."
      )
    n_axes = entry.spec.num_input_axes
    for x in entry.inputs:
      shape = tuple(x.shape)
      if len(shape) < n_axes:
        raise ValueError(
            f"layer {layer.name!r}: its input of shape {shape} has fewer than "
            f"the {n_axes} axes its {type(entry.spec).__name__} contracts. "
            "Pass the activations that nysact_optax.capture_activations returns."
        )
      if n_axes >= len(layer.layer_kernel_shape):
        raise ValueError(
            f"layer {layer.name!r}: its input of shape {shape} comes from a "
            f"{type(entry.spec).__name__} that contracts {n_axes} kernel axes, "
            f"but its kernel {layer.kernel_shape} has "
            f"{len(layer.kernel_shape)} axes, so at most "
            f"{len(layer.kernel_shape) - 1} can meet the input. "
            "The activations must come from the forward pass of the model "
            "whose gradients you update."
        )
    seen = entry.kernel_shape
    if seen is not None and seen != layer.layer_kernel_shape:
      extra = len(layer.kernel_shape) - len(seen)
      if not layer.stack_axes and extra > 0 and layer.kernel_shape[extra:] == seen:
        raise ValueError(
            f"layer {layer.name!r} has a kernel of shape {layer.kernel_shape} in "
            f"the params, but the module computes with a kernel of shape {seen}: "
            "it is stacked by a lifted transform (nn.scan, nn.vmap). Pass "
            f"stack_axes={{{layer.name!r}: {extra}}}."
        )
      raise ValueError(
          f"layer {layer.name!r}: the module computes with a kernel of shape "
          f"{seen}, but the params have {layer.kernel_shape} with "
          f"stack_axes={layer.stack_axes}. Pass the params tree of the same "
          "model, and stack_axes= for layers under nn.scan/nn.vmap."
      )
    spec_axes = tuple(entry.spec.kernel_input_axes)
    if spec_axes != layer.input_axes:
      raise ValueError(
          f"layer {layer.name!r}: its input meets kernel axes {spec_axes}, but "
          f"the kernel {layer.layer_kernel_shape} was taken to have input axes "
          f"{layer.input_axes}. The kernel layout is unusual: pass "
          f"input_axes={{{layer.name!r}: {_axes_hint(spec_axes)}}}."
      )
    for x in entry.inputs:
      if tuple(x.shape[: layer.stack_axes]) != layer.stack_shape:
        raise ValueError(
            f"layer {layer.name!r} is stacked {layer.stack_shape} "
            f"(stack_axes={layer.stack_axes}), but a captured input has shape "
            f"{tuple(x.shape)}: the nn.scan/nn.vmap must stack the "
            "'nysact_inputs' collection like the params, e.g. "
            "variable_axes={'params': 0, 'nysact_inputs': 0}."
        )
      width = entry.spec.input_width(x.shape[layer.stack_axes :])
      if width != layer.p_in:
        raise ValueError(
            f"layer {layer.name!r}: its input of shape {tuple(x.shape)} has {width} "
            f"features, but its kernel {layer.kernel_shape} expects "
            f"{layer.p_in}. The activations must come from the forward pass "
            "of the model whose gradients you update (same params tree, same "
            "input feature size)."
        )
  return table
