"""How far ``nystrom="shifted"`` with ``sketch_refresh="reference"`` is from
the authors' literal code.

The authors' code (design note, section 2) factorises ``W = S^T C_rho``
without symmetrising it (``eigh`` and ``cholesky`` read one triangle) and
solves ``B = C_rho L^{-1}``; the library symmetrises ``W`` and solves
``B = C_rho L^{-T}`` (the standard Nyström formula). With reference sketches
the EMA mixes statistics of different sketches, so ``W`` is not symmetric and
the two differ. This script measures by how much, on scikit-learn digits
inputs (p = 65 with the bias column): the relative Frobenius distance between
the dense ``P`` of (a) the library, (b) the literal code, (c) the literal
code with ``L^{-T}`` only (isolating the symmetrisation).

  python -m benchmarks.authors_literal --out benchmarks/results/authors_literal.json
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

from benchmarks import _common
from benchmarks import results as bresults
from benchmarks._reference import dense_preconditioner, reference_preconditioner
from nysact_optax.linalg import draw_sketch, nystrom_shifted


def _distance(a, b) -> float:
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rank", type=int, default=10)
  parser.add_argument("--damping", type=float, nargs="+", default=[0.01, 1.0])
  parser.add_argument("--updates", type=int, default=10, help="statistics updates in the EMA")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--out", default=str(_common.RESULTS_DIR / "authors_literal.json"))
  args = parser.parse_args(argv)

  x = load_digits().data / 16.0
  p, beta = x.shape[1] + 1, 0.95
  rows = []
  for rho in args.damping:
    for seed in range(args.seeds):
      rng = np.random.default_rng(seed)
      c = np.zeros((p, args.rank))
      for t in range(args.updates):  # a new sketch at every update: "reference"
        a = np.concatenate([x[rng.choice(len(x), args.batch)], np.ones((args.batch, 1))], 1)
        s = np.asarray(
          draw_sketch(jax.random.PRNGKey(1000 * seed + t), p, args.rank, "gaussian").matrix,
          np.float64,
        )
        c = beta * c + (1 - beta) * (a.T @ (a @ s)) / args.batch
      c_hat = c / (1 - beta**args.updates)
      literal = reference_preconditioner(c_hat, s, rho, solve_with_l=True)
      transposed = reference_preconditioner(c_hat, s, rho, solve_with_l=False)
      u, lam = nystrom_shifted(jnp.asarray(c_hat, jnp.float32), jnp.asarray(s, jnp.float32), rho)
      ours = dense_preconditioner(u, lam, rho)
      rows.append(
        {
          "damping": rho,
          "seed": seed,
          "library_vs_literal": _distance(ours, literal),
          "literal_with_LT_vs_literal": _distance(transposed, literal),
          "library_vs_literal_with_LT": _distance(ours, transposed),
        }
      )
  summary = {}
  for rho in args.damping:
    mine = [r for r in rows if r["damping"] == rho]
    summary[str(rho)] = {
      k: [min(r[k] for r in mine), max(r[k] for r in mine)]
      for k in ("library_vs_literal", "literal_with_LT_vs_literal", "library_vs_literal_with_LT")
    }
    print(
      f"damping {rho}: "
      + "; ".join(f"{k} {lo:.3f}-{hi:.3f}" for k, (lo, hi) in summary[str(rho)].items())
    )
  method = "relative Frobenius distance of dense P, float64 reference"
  results = {"rows": rows, "summary": summary}
  rec = bresults.record("authors_literal", config=bresults.config_of(args, method), metrics=results)
  bresults.save(args.out, rec)


if __name__ == "__main__":
  main()
