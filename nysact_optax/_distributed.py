"""Sharding helpers: keeping the factors replicated under ``jit`` with a mesh.

NysAct's state holds per layer a ``p x r`` covariance EMA, a ``p x r`` basis
and ``r`` eigenvalues: small next to the layer's ``p x o`` kernel. Under
``jit`` with a :class:`jax.sharding.Mesh` they are kept **replicated** on every
device, whatever the sharding of the batch or of the kernels:

- the statistics ``Y = A^T (A S) / n`` contract the (sharded) row axes of the
  activations, so XLA all-reduces a ``p x r`` partial sum per layer, and the
  result is constrained to be replicated (``reshard`` for
  ``AxisType.Explicit`` axes, ``with_sharding_constraint`` for
  ``AxisType.Auto`` axes);
- the factorisation then runs redundantly on every device on replicated
  inputs (it is ``O(p r^2)``), and the factored apply ``G U`` / ``U (U^T G)``
  keeps the gradient's own sharding (an output axis sharded over a model axis
  stays sharded, with no communication).

Under ``pmap`` or ``shard_map`` the statistics are averaged explicitly with
``lax.pmean`` over ``axis_name`` instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["contraction_out_sharding", "replicate", "sharded_axes_first", "varying_like"]


def _mesh_of(*operands: jax.Array):
  """The mesh in context (``jax.set_mesh``) or of the operands' types, or ``None``.

  Under ``jit`` with ``NamedSharding`` in/out shardings but no ``set_mesh``
  there is no mesh in context, only the (abstract) mesh of the operands'
  types: the helpers below therefore always spell shardings as
  ``NamedSharding(mesh, ...)``, never as a bare ``PartitionSpec`` (which
  needs a mesh in context).
  """
  mesh = jax.sharding.get_abstract_mesh()
  for x in operands:
    if not mesh.empty:
      break
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", mesh)
  return None if mesh.empty else mesh


def _replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def contraction_out_sharding(*operands: jax.Array) -> NamedSharding | None:
  """``out_sharding`` for a contraction whose result is to be replicated.

  With ``AxisType.Explicit`` axes a contraction over an axis sharded on both
  sides needs its output sharding spelled out; elsewhere ``None`` lets the
  compiler (or ``pmap``) decide.

  Examples:
    >>> import jax.numpy as jnp
    >>> print(contraction_out_sharding(jnp.ones((4, 2))))  # no mesh anywhere
    None
  """
  mesh = _mesh_of(*operands)
  if mesh is not None and mesh.explicit_axes and not mesh.manual_axes:
    return _replicated(mesh)
  return None


def sharded_axes_first(x: jax.Array, n: int) -> jax.Array:
  """``x`` with its first ``n`` axes reordered so the explicitly sharded ones lead.

  Merging leading axes into one batch axis is free when the sharded axis is
  the major one; a sharded minor axis would make the merge a resharding (an
  error under ``AxisType.Explicit``). Only for axes whose order does not
  matter, such as the row axes of ``A^T A``.

  Examples:
    >>> import jax.numpy as jnp
    >>> sharded_axes_first(jnp.ones((2, 3, 4)), 2).shape  # unsharded: unchanged
    (2, 3, 4)
  """
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  if not spec:
    return x
  order = sorted(range(n), key=lambda a: spec[a] is None)  # stable: sharded first
  if order == list(range(n)):
    return x
  return jnp.transpose(x, order + list(range(n, x.ndim)))


def replicate(x: jax.Array, like: jax.Array | None = None) -> jax.Array:
  """``x`` constrained to be replicated over the current mesh (no-op without one).

  The mesh is the one in context, else the one of ``x``'s type, else the one
  of ``like``'s type (a constant such as a sketch has none of its own under
  ``jit`` without ``jax.set_mesh``). Under ``AxisType.Explicit`` axes this
  also gives such a constant the mesh's replicated type, as the sharding
  rules of transposed convolutions require. Manual axes (inside
  ``shard_map`` or ``pmap``) are left alone: there each device holds its own
  value and ``lax.pmean`` does the averaging.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> rows = jax.device_put(jnp.ones((4, 2)), NamedSharding(mesh, P("data")))
    >>> jax.jit(replicate)(rows).sharding.is_fully_replicated  # no set_mesh needed
    True
  """
  mesh = _mesh_of(x) if like is None else _mesh_of(x, like)
  if mesh is None or mesh.manual_axes:
    return x
  if mesh.explicit_axes:
    sharding = jax.typeof(x).sharding
    if sharding.mesh.empty or any(entry is not None for entry in sharding.spec):
      return jax.sharding.reshard(x, _replicated(mesh))
    return x
  return jax.lax.with_sharding_constraint(x, _replicated(mesh))


def varying_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """``x`` typed like ``like``: on its mesh, and varying over the manual axes
  ``like`` varies over.

  Inside ``shard_map`` the transpose of an operation with respect to an
  invariant (replicated) operand sums its cotangent over the devices. The
  convolution statistics take ``A^T Z`` as a kernel-gradient: with an
  invariant sketch kernel that gradient would be summed over every device
  before ``lax.pmean``, so the sketch is made varying like the activations.
  Under ``jit`` with sharded operands but no mesh in context, a constant
  ``x`` is first placed, replicated, on ``like``'s mesh (see
  :func:`replicate`).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> varying_like(jnp.ones(3), jnp.zeros(2)).shape  # no mesh: unchanged
    (3,)
  """
  if _mesh_of(x) is None:
    x = replicate(x, like)
  axes = tuple(sorted(getattr(jax.typeof(like), "vma", ())))
  missing = tuple(a for a in axes if a not in getattr(jax.typeof(x), "vma", ()))
  return jax.lax.pcast(x, missing, to="varying") if missing else x
