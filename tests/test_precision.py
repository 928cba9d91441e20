"""Every product NysAct emits carries the precision its setting asks for.

On CPU XLA ignores matmul precision, so these tests read the jaxpr: every
``dot_general`` and ``conv_general_dilated`` traced under a ``nysact/``
named scope must carry an explicit precision, the statistics' setting under
``nysact/statistics`` (and ``nysact/micro_batch_statistics``), ``HIGHEST``
under ``nysact/factors`` and in sketch draws, the apply's setting under
``nysact/apply``. A product that lost its ``precision=`` (``None`` in the
jaxpr: the platform default) fails them.
"""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nysact_optax

HIGHEST = jax.lax.Precision.HIGHEST
PRODUCTS = ("dot_general", "conv_general_dilated")


class Net(nn.Module):
  """A conv with a bias, a bias-free conv, a dense on (b, t, d), a small
  dense in exact mode (p <= rank)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), padding="SAME", name="conv")(x))
    x = nn.relu(nn.Conv(5, (3, 3), strides=2, use_bias=False, name="conv_nb")(x))
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # (b, tokens, 5)
    x = nn.relu(nn.Dense(7, name="dense")(x))
    return nn.Dense(2, use_bias=False, name="tiny")(x[:, :, :3])


def _sub_jaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _products(jaxpr, prefix=""):
  """``(name stack, primitive, precision)`` of every product, at any depth.

  A sub-jaxpr (cond branch, pjit, custom_jvp, while, scan) has name stacks
  relative to its equation's, so they are joined.
  """
  for eqn in jaxpr.eqns:
    where = f"{prefix}/{eqn.source_info.name_stack}"
    if eqn.primitive.name in PRODUCTS:
      yield where, eqn.primitive.name, eqn.params.get("precision")
    for sub in _sub_jaxprs(eqn.params):
      yield from _products(sub, where)


def _expected(where, stats, apply):
  """The precision a product at ``where`` must carry, or None outside NysAct."""
  if "nysact/" not in where:
    return None
  if "/sketch" in where or "nysact/factors/" in where:
    return "factors", HIGHEST
  if "nysact/statistics/" in where or "nysact/micro_batch_statistics/" in where:
    return "statistics", stats
  if "nysact/apply/" in where:
    return "apply", apply
  raise AssertionError(f"a product under an unknown NysAct scope: {where}")


def _precisions(value):
  """The per-operand precisions of a product's ``precision`` parameter."""
  if value is None:
    return (None, None)
  return tuple(value) if isinstance(value, tuple) else (value, value)


def _check(jaxpr, stats, apply):
  counts = collections.Counter()
  for where, prim, precision in _products(jaxpr):
    expected = _expected(where, stats, apply)
    if expected is None:
      continue
    scope, want = expected
    assert _precisions(precision) == (want, want), (where, prim, precision, want)
    counts[scope, prim] += 1
  return counts


def _setup(**kw):
  model = Net()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 3))
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  tx = nysact_optax.scale_by_nysact(rank=4, cov_update_every=1, inv_update_every=1, **kw)
  apply = nysact_optax.capture_activations(model.apply)

  def grads_and_acts(p):
    def loss(p):
      y, acts = apply({"params": p}, x)
      return jnp.sum(y**2), acts

    (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(p)
    return grads, acts

  return params, tx, grads_and_acts


SETTINGS = [
  ("highest", HIGHEST, HIGHEST, {}),
  (("default", "high"), jax.lax.Precision.DEFAULT, jax.lax.Precision.HIGH, {}),
  (
    ("tensorfloat32", jax.lax.Precision.DEFAULT),
    jax.lax.Precision.HIGH,
    jax.lax.Precision.DEFAULT,
    {"nystrom": "shifted", "relative_damping": True},
  ),
  ("bfloat16", jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT, {"sketch": "subcolumns"}),
]


@pytest.mark.parametrize("precision,stats,apply,kw", SETTINGS)
def test_every_product_of_a_step_carries_its_precision(precision, stats, apply, kw):
  params, tx, grads_and_acts = _setup(precision=precision, **kw)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads, acts = grads_and_acts(params)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state

  counts = _check(jax.make_jaxpr(step)(params, state).jaxpr, stats, apply)
  # Each phase was traced and found: a scope whose products all lost their
  # names (or were never emitted) would go unchecked otherwise.
  # 2 per conv layer (convolutions, or GEMMs on a small input's patches), 2
  # for the dense layer.
  assert _statistics_products(counts) >= 5, counts
  assert counts["factors", "dot_general"] >= 6, counts
  assert counts["apply", "dot_general"] >= 8, counts  # 2 per layer


def test_micro_batch_statistics_use_the_state_precision():
  params, tx, grads_and_acts = _setup(precision=("default", "highest"))
  state = tx.init(params)
  assert nysact_optax.find_nysact_state(state).config.precision == jax.lax.Precision.DEFAULT

  def stats(params, state):
    _, acts = grads_and_acts(params)
    return nysact_optax.sketched_statistics(state, acts)

  counts = _check(jax.make_jaxpr(stats)(params, state).jaxpr, jax.lax.Precision.DEFAULT, HIGHEST)
  assert _statistics_products(counts) >= 5, counts


def _statistics_products(counts):
  return counts["statistics", "conv_general_dilated"] + counts["statistics", "dot_general"]


def test_walker_sees_a_product_without_precision():
  """The check fails on a NysAct product left at the platform default."""

  def f(a, b):
    with jax.named_scope("nysact/apply/layer"):
      return jax.lax.cond(a.sum() > 0, lambda: a @ b, lambda: jnp.matmul(a, b, precision=HIGHEST))

  jaxpr = jax.make_jaxpr(f)(jnp.ones((2, 2)), jnp.ones((2, 2))).jaxpr
  found = [p for w, _, p in _products(jaxpr) if "nysact/apply/" in w]
  assert len(found) == 2 and None in found
  with pytest.raises(AssertionError):
    _check(jaxpr, HIGHEST, HIGHEST)


def test_highest_is_the_default():
  state = nysact_optax.scale_by_nysact().init({"d": {"kernel": jnp.ones((3, 2))}})
  assert state.config.precision == HIGHEST


@pytest.mark.parametrize("bad", [None, "float16", ("highest",), 3, ("high", "fast")])
def test_bad_precision_is_rejected_naming_it(bad):
  with pytest.raises(ValueError, match=r"precision must be .* got precision="):
    nysact_optax.scale_by_nysact(precision=bad)


def test_precision_changes_nothing_on_cpu():
  """XLA:CPU computes float32 products in float32 whatever the precision."""
  params, _, grads_and_acts = _setup()
  grads, acts = grads_and_acts(params)
  out = {}
  for precision in ("highest", "default"):
    tx = nysact_optax.scale_by_nysact(
      rank=4, cov_update_every=1, inv_update_every=1, precision=precision
    )
    step = jax.jit(lambda g, s, a, tx=tx: tx.update(g, s, params, activations=a))  # op by op: ~50 s
    out[precision], _ = step(grads, tx.init(params), acts)
  if jax.default_backend() == "cpu":
    jax.tree.map(np.testing.assert_array_equal, out["highest"], out["default"])
