"""Two-sided SOAP (Vyas et al. 2024, "SOAP: Improving and stabilizing
Shampoo using Adam", arXiv 2409.11321) as an optax transformation, written
for the benchmarks from the paper's algorithm.

Per matrix parameter with gradient ``G`` (``m x n``: the reduction axes of
the kernel, then its output axes, by the same dimension numbers as Muon's,
:func:`nysact_optax.muon_dimension_numbers`):

* ``L <- b_s L + (1 - b_s) G G^T`` and ``R <- b_s R + (1 - b_s) G^T G``
  (``b_s`` = ``shampoo_beta``, by default Adam's ``b2``, as the paper);
* the eigenbases ``Q_L``, ``Q_R`` are ``eigh`` of ``L`` and ``R`` after the
  first gradient (that step only gathers statistics: the update is zero),
  then refreshed every ``precondition_frequency`` (10) steps by one power
  iteration and a QR, ``Q <- qr(L Q)``, the columns of the old ``Q`` first
  sorted by their estimated eigenvalue ``diag(Q^T L Q)`` (descending), the
  second moment's rows/columns permuted alike;
* Adam in the rotated coordinates: ``G' = Q_L^T G Q_R``,
  ``V <- b2 V + (1 - b2) G'^2``; the first moment ``M <- b1 M + (1 - b1) G``
  is kept in the parameter's coordinates, so it rotates with the basis at
  every refresh (the reference projects it back and forth, the same thing),
  and enters rotated, ``M' = Q_L^T M Q_R``;
* the step ``Q_L (M' / (sqrt(V) + eps)) Q_R^T x sqrt(1 - b2^t) / (1 - b1^t)``
  (``t`` counts the steps after the first);
* a side longer than ``max_precond_dim`` (10000, the paper's: vocabulary
  sides stay unrotated) keeps the identity for its basis (one-sided SOAP);
* every other leaf (biases, norm scales, anything with no dimension
  numbers) gets the same Adam without rotation: AdamW once
  :func:`soap` adds the decoupled weight decay.

Which leaves are matrices (:func:`soap_dimension_numbers`): the kernels of
the layers the library finds, reshaped by their input/output axes, and the
other leaves with two or more axes that are not biases (embedding tables,
learned position embeddings: ``(leading axes) x (last axis)``). The paper's
nanoGPT runs precondition every 2-D parameter, the embedding and the head
included, with ``max_precond_dim`` leaving vocabulary-sized sides one-sided;
so does this (the character vocabulary is far below the bound, so both of
its sides are rotated).

Differences from the authors' PyTorch code, all outside the algorithm: the
weight decay is optax's decoupled ``-lr * wd * p`` on the parameter before
the step (theirs: after it), and it is applied at the first step too (the
benchmarks' warm-up has a zero learning rate there).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import nysact_optax

Dims = optax.contrib.MuonDimensionNumbers


class SoapLeafState(NamedTuple):
  """One leaf's state; matrices have a leading batch axis (stacked copies).

  ``mu``: first moment, the leaf's own coordinates (as the matrix ``B x m x
  n`` for a matrix leaf); ``nu``: second moment, rotated coordinates;
  ``left``/``right``: the EMAs of ``G G^T`` and ``G^T G``; ``q_left`` /
  ``q_right``: their eigenbases (``None`` for a side left unrotated and for
  non-matrix leaves).
  """

  mu: jax.Array
  nu: jax.Array
  left: jax.Array | None = None
  right: jax.Array | None = None
  q_left: jax.Array | None = None
  q_right: jax.Array | None = None


class ScaleBySoapState(NamedTuple):
  count: jax.Array  # calls so far (the first only gathers statistics)
  leaves: Any


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def soap_dimension_numbers(params: Any, **kwargs: Any) -> Any:
  """Each leaf's matrix layout for SOAP: the Muon dimension numbers of the
  library's layers (:func:`nysact_optax.muon_dimension_numbers`, ``kwargs``
  passed on; nothing excluded by default), and ``(leading axes) x (last
  axis)`` for every other leaf with two or more axes that is not a bias;
  ``None`` (Adam) for the rest."""
  dims = nysact_optax.muon_dimension_numbers(params, **kwargs)

  def one(path, leaf, dim):
    if dim is not None or leaf is None or isinstance(leaf, optax.MaskedNode):
      return dim
    name = _key_name(path[-1]) if path else ""
    if getattr(leaf, "ndim", 0) >= 2 and name != "bias":
      return Dims(reduction_axis=tuple(range(leaf.ndim - 1)), output_axis=(leaf.ndim - 1,))
    return None

  is_leaf = lambda x: x is None or isinstance(x, optax.MaskedNode)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)
  dflat = treedef.flatten_up_to(dims)
  return treedef.unflatten([one(p, leaf, d) for (p, leaf), d in zip(flat, dflat, strict=True)])


def _layout(shape: tuple[int, ...], dim: Dims):
  """(perm, (batch, m, n)) taking a leaf to ``batch x m x n``."""
  nd = len(shape)
  as_tuple = lambda a: (a,) if isinstance(a, int) else tuple(a)
  red = tuple(a % nd for a in as_tuple(dim.reduction_axis))
  out = tuple(a % nd for a in as_tuple(dim.output_axis))
  batch = tuple(a for a in range(nd) if a not in red + out)
  perm = batch + red + out
  size = lambda axes: math.prod(shape[a] for a in axes)
  return perm, (size(batch), size(red), size(out))


def _to_matrix(x: jax.Array, dim: Dims) -> jax.Array:
  perm, flat = _layout(x.shape, dim)
  return x.transpose(perm).reshape(flat)


def _from_matrix(m: jax.Array, shape: tuple[int, ...], dim: Dims) -> jax.Array:
  perm, _ = _layout(shape, dim)
  inv = tuple(sorted(range(len(shape)), key=lambda i: perm[i]))
  return m.reshape(tuple(shape[a] for a in perm)).transpose(inv)


def _eigvecs(c: jax.Array) -> jax.Array:
  """Eigenvectors of a symmetric matrix, eigenvalues descending."""
  return jnp.linalg.eigh(c)[1][:, ::-1]


def _refresh(c: jax.Array, q: jax.Array, nu: jax.Array, axis: int):
  """One power iteration + QR on the basis ``q`` of ``c``, its columns first
  sorted by estimated eigenvalue (descending); ``nu`` permuted alike."""
  order = jnp.argsort(-jnp.diag(q.T @ c @ q))
  q = q[:, order]
  nu = jnp.take(nu, order, axis=axis)
  return jnp.linalg.qr(c @ q)[0], nu


def scale_by_soap(
  b1: float = 0.95,
  b2: float = 0.95,
  eps: float = 1e-8,
  *,
  shampoo_beta: float | None = None,
  precondition_frequency: int = 10,
  max_precond_dim: int = 10000,
  dimension_numbers: Callable[[Any], Any] | Any = soap_dimension_numbers,
) -> optax.GradientTransformation:
  """SOAP's direction (no learning rate, no weight decay; the module's
  docstring has the algorithm). ``dimension_numbers``: a tree of
  ``MuonDimensionNumbers``/``None`` like the parameters, or a callable on
  them (default :func:`soap_dimension_numbers`)."""
  bs = b2 if shampoo_beta is None else shampoo_beta

  def dims_of(tree):
    return dimension_numbers(tree) if callable(dimension_numbers) else dimension_numbers

  is_dim = lambda x: x is None or isinstance(x, Dims)

  def init_leaf(p, dim):
    if dim is None:
      return SoapLeafState(jnp.zeros_like(p), jnp.zeros_like(p))
    _, (b, m, n) = _layout(p.shape, dim)

    def side(k):
      if k > max_precond_dim:
        return None, None
      return jnp.zeros((b, k, k), p.dtype), jnp.tile(jnp.eye(k, dtype=p.dtype), (b, 1, 1))

    left, q_left = side(m)
    right, q_right = side(n)
    # distinct buffers (the trainer donates the state)
    mu, nu = jnp.zeros((b, m, n), p.dtype), jnp.zeros((b, m, n), p.dtype)
    return SoapLeafState(mu, nu, left, right, q_left, q_right)

  def init_fn(params):
    dims = dims_of(params)
    leaves = jax.tree.map(lambda d, p: init_leaf(p, d), dims, params, is_leaf=is_dim)
    return ScaleBySoapState(jnp.zeros([], jnp.int32), leaves)

  def matrix_step(g, s: SoapLeafState, t):
    """One copy: g (m x n), the state without its batch axis; t >= 1 (int)."""
    lq, rq = s.q_left, s.q_right

    def rot(x):
      x = x if lq is None else lq.T @ x
      return x if rq is None else x @ rq

    def back(x):
      x = x if lq is None else lq @ x
      return x if rq is None else x @ rq.T

    mu = b1 * s.mu + (1 - b1) * g
    nu = b2 * s.nu + (1 - b2) * jnp.square(rot(g))
    tf = t.astype(g.dtype)
    scale = jnp.sqrt(1 - b2**tf) / (1 - b1**tf)
    update = back(rot(mu) / (jnp.sqrt(nu) + eps)) * scale
    left = None if s.left is None else bs * s.left + (1 - bs) * (g @ g.T)
    right = None if s.right is None else bs * s.right + (1 - bs) * (g.T @ g)

    def refresh(args):
      nu, lq, rq = args
      if left is not None:
        lq, nu = _refresh(left, lq, nu, 0)
      if right is not None:
        rq, nu = _refresh(right, rq, nu, 1)
      return nu, lq, rq

    nu, lq, rq = jax.lax.cond(t % precondition_frequency == 0, refresh, lambda a: a, (nu, lq, rq))
    return update, SoapLeafState(mu, nu, left, right, lq, rq)

  def matrix_first(g, s: SoapLeafState):
    """The first gradient: statistics and the eigh bases, a zero update."""
    left = None if s.left is None else (1 - bs) * (g @ g.T)
    right = None if s.right is None else (1 - bs) * (g.T @ g)
    lq = None if left is None else _eigvecs(left)
    rq = None if right is None else _eigvecs(right)
    return jnp.zeros_like(g), SoapLeafState(s.mu, s.nu, left, right, lq, rq)

  def update_leaf(g, s: SoapLeafState, dim, count):
    if dim is None:

      def first(g, s):
        return jnp.zeros_like(g), s

      def step(g, s):
        mu = b1 * s.mu + (1 - b1) * g
        nu = b2 * s.nu + (1 - b2) * jnp.square(g)
        tf = count.astype(g.dtype)
        scale = jnp.sqrt(1 - b2**tf) / (1 - b1**tf)
        return mu / (jnp.sqrt(nu) + eps) * scale, SoapLeafState(mu, nu)

      return jax.lax.cond(count == 0, first, step, g, s)
    gm = _to_matrix(g, dim)
    u, s = jax.lax.cond(
      count == 0,
      lambda gm, s: jax.vmap(matrix_first)(gm, s),
      lambda gm, s: jax.vmap(matrix_step, in_axes=(0, 0, None))(gm, s, count),
      gm,
      s,
    )
    return _from_matrix(u, g.shape, dim), s

  def update_fn(updates, state, params=None):
    del params
    dims = dims_of(updates)
    treedef = jax.tree.structure(dims, is_leaf=is_dim)
    flat_d = treedef.flatten_up_to(dims)
    flat_g = treedef.flatten_up_to(updates)
    flat_s = treedef.flatten_up_to(state.leaves)
    out = [
      update_leaf(g, s, d, state.count) for g, s, d in zip(flat_g, flat_s, flat_d, strict=True)
    ]
    new_updates = treedef.unflatten([u for u, _ in out])
    leaves = treedef.unflatten([s for _, s in out])
    return new_updates, ScaleBySoapState(optax.safe_increment(state.count), leaves)

  return optax.GradientTransformation(init_fn, update_fn)


def soap(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.95,
  b2: float = 0.95,
  eps: float = 1e-8,
  weight_decay: float = 1e-2,
  **kwargs: Any,
) -> optax.GradientTransformation:
  """SOAP with decoupled weight decay (the authors' defaults: b1 = b2 =
  0.95, weight decay 1e-2, refresh every 10 steps, max_precond_dim 10000);
  ``kwargs`` go to :func:`scale_by_soap`."""
  return optax.chain(
    scale_by_soap(b1, b2, eps, **kwargs),
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_learning_rate(learning_rate),
  )
