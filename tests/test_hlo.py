"""The compiled step does its p-sized work as products: every LAPACK call
(Cholesky, triangular solve, eigendecomposition, QR) is on r x r matrices.

A threaded CPU LAPACK runs a triangular solve with a p x r right-hand side
50-170x slower than the same work as a product (design note, section 6).
"""

import re

import jax
import jax.numpy as jnp
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
