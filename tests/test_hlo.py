"""The compiled step does its p-sized work as products: every LAPACK call
(Cholesky, triangular solve, eigendecomposition, QR) is on r x r matrices.

A threaded CPU LAPACK runs a triangular solve with a p x r right-hand side
50-170x slower than the same work as a product (design note, section 6).
And the periodic statistics keep no layer input alive past its last use.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import nysact_optax

P_IN, RANK = 300, 10


def _lapack_shapes(hlo: str) -> list[tuple[str, list[tuple[int, ...]]]]:
  calls = []
  for line in hlo.splitlines():
    target = re.search(r'custom_call_target="(lapack_\w+)"', line)
    if target or re.search(r"= \S+ (triangular-solve|cholesky)\(", line):
      shapes = [
        tuple(int(d) for d in dims.split(",") if d)
        for dims in re.findall(r"f(?:32|64)\[([\d,]*)\]", line)
      ]
      calls.append((target.group(1) if target else "native", shapes))
  return calls


@pytest.mark.parametrize("nystrom", ["stable", "shifted"])
@pytest.mark.parametrize("sketch", ["gaussian", "subcolumns"])
def test_lapack_only_on_rank_sized_matrices(nystrom, sketch):
  # Two layers in one padded group: LAPACK calls carry a batch axis of 2.
  widths = {"d": P_IN, "e": P_IN // 2}
  params = {k: {"kernel": jnp.ones((n, 20)), "bias": jnp.zeros(20)} for k, n in widths.items()}
  tx = nysact_optax.scale_by_nysact(
    rank=RANK, sketch=sketch, nystrom=nystrom, cov_update_every=1, inv_update_every=1
  )
  acts = {
    k: nysact_optax.LayerInputs([jnp.ones((8, n))], nysact_optax.DenseSpec())
    for k, n in widths.items()
  }
  step = jax.jit(lambda g, s, a: tx.update(g, s, activations=a))
  hlo = step.lower(params, tx.init(params), acts).compile().as_text()
  calls = _lapack_shapes(hlo)
  assert calls, "no LAPACK call found: the HLO scan is broken"
  for target, shapes in calls:  # the matrix axes are the last two; batch axes lead
    assert all(max(shape[-2:], default=0) <= RANK for shape in shapes), (target, shapes)


class _ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    for features in (16, 16, 32, 32):
      x = nn.relu(nn.Conv(features, (3, 3))(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_periodic_statistics_keep_no_layer_input_alive():
  # The statistics run in one cond per layer, which XLA schedules where the
  # layer's input dies in the backward pass. Under one cond for every layer
  # the inputs stayed alive to the end of the step: 1.93x SGD's temp bytes
  # here (ResNet-20: 2.3x), paid on every step as memory and page faults.
  model = _ConvNet()
  x, y = jnp.ones((32, 16, 16, 3)), jnp.zeros((32,), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  apply = nysact_optax.capture_activations(model.apply)

  def temp_bytes(tx, capture):
    def step(params, opt_state):
      def loss(p):
        if capture:
          logits, acts = apply({"params": p}, x)
        else:
          logits, acts = model.apply({"params": p}, x), None
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), acts

      (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(params)
      extra = {"activations": acts} if capture else {}
      updates, opt_state = tx.update(grads, opt_state, params, **extra)
      return optax.apply_updates(params, updates), opt_state

    compiled = jax.jit(step).lower(params, tx.init(params)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  sgd = temp_bytes(optax.sgd(0.1, momentum=0.9), capture=False)
  nysact = temp_bytes(nysact_optax.nysact(0.1), capture=True)  # T_cov = 5: under cond
  assert nysact <= 1.5 * sgd, (nysact, sgd)
