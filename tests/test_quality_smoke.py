"""Smoke version of the training-quality suite (benchmarks/quality): a few
steps on tiny data, checking the JSON each run writes, the resumable runner
and the summary."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import data as bdata
from benchmarks.quality import suite, summary, train


def test_augment_is_a_padded_crop_or_its_mirror():
  rng = np.random.default_rng(0)
  x = rng.random((16, 6, 5, 1)).astype(np.float32)
  out = train.augment(x, np.random.default_rng(1), pad=2)
  assert out.shape == x.shape and out.dtype == x.dtype
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  flips = 0
  for i in range(len(x)):
    crops = {
      (dy, dx, f): padded[i, dy : dy + 6, dx : dx + 5][:, :: -1 if f else 1]
      for dy in range(5)
      for dx in range(5)
      for f in (0, 1)
    }
    match = [k for k, c in crops.items() if np.array_equal(c, out[i])]
    assert match, f"image {i} is not a crop of the padded input"
    flips += all(k[2] for k in match)
  assert 0 < flips < len(x)  # both orientations occur


def test_suite_resumes_and_summary_reports(tmp_path):
  runs = tmp_path / "runs"
  args = ["--preset", "smoke", "--stages", "tune,test", "--out-dir", str(runs)]
  written = suite.main(args)
  names = sorted(p.relative_to(runs).as_posix() for p in written)
  assert names == [
    "test/digits__foof__s0.json",
    "test/digits__sgd__s0.json",
    "tune/digits__foof__lr0.1__s0.json",
    "tune/digits__sgd__lr0.1__s0.json",
  ]
  for path in written:
    r = json.loads(path.read_text())
    val = "tune" in path.parts
    assert r["config"]["split"] == ("val" if val else "test")
    # digits: 1437 train / 360 test; the validation split is a fifth of train
    assert r["metrics"]["final"]["eval_examples"] == (287 if val else 360)
    assert not r["metrics"]["final"]["diverged"]
    assert [p["step"] for p in r["curves"]["eval"]] == [10, 20] and r["metrics"]["final"][
      "steps_done"
    ] == 20
    assert r["metrics"]["final"]["eval_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert r["metrics"]["timing"]["train_s"] > 0
  foof = json.loads((runs / "test/digits__foof__s0.json").read_text())
  assert foof["config"]["nysact"] == {"rank": 10**9}
  assert foof["metrics"]["nysact_refresh_failures"] == {
    "Conv_0": 0,
    "Conv_1": 0,
    "Dense_0": 0,
    "Dense_1": 0,
  }
  # Exact mode: the optimizer's factors are the eigendecomposition of the same
  # EMA that the tracker recomputes, so the tracked error is round-off.
  errors = foof["curves"]["preconditioner_error"]
  assert [e["step"] for e in errors] == [10, 20] and errors[0]["p"] == 65
  assert max(e["rel_fro"] for e in errors) < 1e-4, errors
  assert suite.main(args) == []  # everything finished: nothing runs again
  stats = summary.main(["--runs", str(runs)])
  assert set(stats["cnn"]) == {"sgd", "foof"} and stats["cnn"]["foof"]["n"] == 1
  md = (tmp_path / "summary.md").read_text()
  assert "| NysAct exact (FOOF) | 0.1 | 1 |" in md and "## Targets" in md
  assert (tmp_path / "curves_cnn.png").stat().st_size > 1000


def test_fashion_mnist_run_writes_json(tmp_path):
  try:
    bdata.load_fashion_mnist("test", limit=1)
  except bdata.DatasetMissingError:
    pytest.skip(f"Fashion-MNIST is not installed; install it with: {bdata.FASHION_MNIST_INSTALL}")
  cfg = train.RunConfig(
    task="fmnist_cnn",
    optimizer="sgd",
    lr=0.05,
    steps=4,
    batch_size=16,
    train_limit=256,
    eval_limit=100,
    eval_every=2,
    eval_size=100,
    model=(("features", (4, 8, 8)), ("hidden", 16)),
  )
  result = train.run(cfg, tmp_path / "f.json")
  saved = json.loads((tmp_path / "f.json").read_text())
  assert saved["metrics"]["final"]["eval_examples"] == 100 and len(saved["curves"]["eval"]) == 2
  assert saved["metrics"]["data"].startswith("Fashion-MNIST, 256 train / 100 test")
  assert result["metrics"]["param_count"] == saved["metrics"]["param_count"] > 0


def _fake_run(root, stage, name, lr, damping, acc):
  path = root / stage / f"{name}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(
    json.dumps(
      {
        "config": {"lr": lr, "damping": damping},
        "metric": "accuracy",
        "final": {"eval_accuracy": acc, "diverged": False},
      }
    )
  )


def test_kfac_damping_is_tuned_at_its_best_learning_rate(tmp_path):
  preset = suite.Preset(
    cnn=train.RunConfig(task="digits", steps=2), grids={"kfac": (0.01, 0.1, 1.0)}, seeds=2
  )

  def planned():
    return {r.name: r.cfg for r in suite.plan(preset, ["tune", "test"], tmp_path)}

  first = planned()
  assert first["digits__kfac__lr?__d0.01__s0"] is None  # waits for the lr grid
  assert first["digits__kfac__s0"] is None
  _fake_run(tmp_path, "tune", "digits__kfac__lr0.01__s0", 0.01, 0.1, 0.7)
  _fake_run(tmp_path, "tune", "digits__kfac__lr0.1__s0", 0.1, 0.1, 0.8)
  _fake_run(tmp_path, "tune", "digits__kfac__lr1__s0", 1.0, 0.1, 0.1)
  second = planned()
  damped = [second[f"digits__kfac__lr0.1__d{d:g}__s0"] for d in suite.DAMPING_GRIDS["kfac"]]
  assert [(c.lr, c.damping, c.split) for c in damped] == [
    (0.1, d, "val") for d in suite.DAMPING_GRIDS["kfac"]
  ]
  assert second["digits__kfac__s0"] is None  # waits for the damping runs
  for d, acc in zip(suite.DAMPING_GRIDS["kfac"], (0.85, 0.6)):
    _fake_run(tmp_path, "tune", f"digits__kfac__lr0.1__d{d:g}__s0", 0.1, d, acc)
  test = [planned()[f"digits__kfac__s{s}"] for s in range(2)]
  best_damping = suite.DAMPING_GRIDS["kfac"][0]  # 0.85 beats 0.8 (train.DAMPING) and 0.6
  assert [(c.lr, c.damping, c.split, c.seed) for c in test] == [
    (0.1, best_damping, "test", s) for s in range(2)
  ]


def test_ablations_change_one_thing_of_their_base(tmp_path):
  preset = suite.PRESETS["cpu"]
  base = suite.ABLATION_BASE
  for lr, acc in zip(preset.grids[base], (0.5, 0.7, 0.6)):
    _fake_run(tmp_path, "tune", f"fmnist_cnn__{base}__lr{lr:g}__s0", lr, 1.0, acc)
  runs = {
    f"{r.stage}/{r.name}": r.cfg for r in suite.plan(preset, ["tune", "test", "ablate"], tmp_path)
  }
  nysact = lambda name: dict(runs[name].nysact)
  shifted = {"nystrom": "shifted", "sketch_refresh": "reference"}
  assert nysact(f"tune/fmnist_cnn__{base}__lr0.1__s0") == shifted
  assert nysact("ablate/fmnist_cnn__rank5__s0") == {"rank": 5, **shifted}
  assert nysact("ablate/fmnist_cnn__fixed_stable__s0") == {
    "nystrom": "stable",
    "sketch_refresh": "fixed",
  }
  assert runs["ablate/fmnist_cnn__damping10__s0"].damping == 10.0
  assert {c.lr for n, c in runs.items() if n.startswith("ablate/")} == {0.1}  # base's best
  assert nysact("tune/fmnist_cnn__nysact-reference__lr0.1__s0") == {"sketch_refresh": "reference"}
  assert "tune/fmnist_cnn__nysact__lr0.1__s0" not in runs  # tuned as nysact-reference
  assert runs["test/fmnist_cnn__nysact__s0"] is None  # whose tuning has not run
  for lr, acc in zip(preset.grids["nysact-reference"], (0.5, 0.6, 0.7)):
    _fake_run(tmp_path, "tune", f"fmnist_cnn__nysact-reference__lr{lr:g}__s0", lr, 1.0, acc)
  # 0.3 is the grid's edge: the grid grows to 1.0, which does worse
  _fake_run(tmp_path, "tune", "fmnist_cnn__nysact-reference__lr1__s0", 1.0, 1.0, 0.1)
  for d in suite.DAMPING_GRIDS["nysact-reference"]:
    _fake_run(tmp_path, "tune", f"fmnist_cnn__nysact-reference__lr0.3__d{d:g}__s0", 0.3, d, 0.2)
  test = {r.name: r.cfg for r in suite.plan(preset, ["test"], tmp_path)}
  cfg = test["fmnist_cnn__nysact__s0"]  # the library's default, at the tuned lr and damping
  assert (dict(cfg.nysact), cfg.lr, cfg.damping, cfg.split) == ({}, 0.3, 1.0, "test")


def test_a_grid_grows_past_the_edge_where_its_best_is(tmp_path):
  def grid():
    return suite.lr_grid(tmp_path, "tune", "t", "adamw", (3e-4, 1e-3, 3e-3))

  assert grid() == ([3e-4, 1e-3, 3e-3], False)
  for lr, acc in ((3e-4, 0.5), (1e-3, 0.6), (3e-3, 0.7)):
    _fake_run(tmp_path, "tune", f"t__adamw__lr{lr:g}__s0", lr, None, acc)
  assert grid() == ([3e-4, 1e-3, 3e-3, 0.01], False)  # best at the top edge
  _fake_run(tmp_path, "tune", "t__adamw__lr0.01__s0", 0.01, None, 0.8)
  assert grid() == ([3e-4, 1e-3, 3e-3, 0.01, 0.03], False)
  _fake_run(tmp_path, "tune", "t__adamw__lr0.03__s0", 0.03, None, 0.9)
  assert grid() == ([3e-4, 1e-3, 3e-3, 0.01, 0.03], True)  # at most two more
  assert suite.best_lr(tmp_path, "tune", "t", "adamw", (3e-4, 1e-3, 3e-3)) == 0.03
  # a best at the bottom edge grows the grid downwards; an interior best stops it
  for lr, acc in ((0.03, 0.7), (0.1, 0.6), (0.3, 0.1)):
    _fake_run(tmp_path, "tune", f"t__sgd__lr{lr:g}__s0", lr, None, acc)
  assert suite.lr_grid(tmp_path, "tune", "t", "sgd", (0.03, 0.1, 0.3)) == (
    [0.01, 0.03, 0.1, 0.3],
    False,
  )
  _fake_run(tmp_path, "tune", "t__sgd__lr0.01__s0", 0.01, None, 0.65)
  assert suite.lr_grid(tmp_path, "tune", "t", "sgd", (0.03, 0.1, 0.3)) == (
    [0.01, 0.03, 0.1, 0.3],
    True,
  )


@pytest.mark.parametrize("label", ["muon", "nysact-graft", "nysact-graft-leaf", "graft-identity"])
def test_issue13_optimizers_train_on_digits(tmp_path, label):
  """The optimizers of stage tf, a few steps each: a JSON, a loss that falls."""
  base = train.RunConfig(
    task="digits", steps=20, batch_size=32, eval_every=10, eval_size=360, split="val"
  )
  cfg = suite._cfg(base, label, lr={"muon": 0.05}.get(label, 1e-2), seed=0)
  r = train.run(cfg, tmp_path / "run.json")
  assert not r["metrics"]["final"]["diverged"]
  assert r["curves"]["eval"][-1]["train_loss"] < 0.8 * r["curves"]["eval"][0]["train_loss"] or (
    r["metrics"]["final"]["eval_accuracy"] > 0.3
  )
  if label.startswith("nysact"):
    assert r["config"]["nysact"]["graft"] == "rmsprop"
    assert set(r["metrics"]["nysact_refresh_failures"]) == {
      "Conv_0",
      "Conv_1",
      "Dense_0",
      "Dense_1",
    }
  assert r["config"]["weight_decay"] == 1e-2


def test_vit_shapes_and_stage_tf_plan(tmp_path):
  import jax
  import jax.numpy as jnp

  from benchmarks import models

  model = models.ViT(width=16, depth=1, num_heads=2)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 28, 28, 1)))["params"]
  assert model.apply({"params": params}, jnp.zeros((3, 28, 28, 1))).shape == (3, 10)
  assert params["patch_embed"]["kernel"].shape == (16, 16)  # 4x4x1 patches
  assert params["position_embed"].shape == (49, 16)
  # Stage tf first tunes the grafted mode on the 300-step LM; its test runs
  # wait for that, while Muon and the control run at their fixed lrs.
  runs = list(suite.plan(suite.PRESETS["cpu"], ["tf"], tmp_path))
  ready = [r for r in runs if r.cfg is not None]
  assert ready[0].name == "char_lm__nysact-graft__lr0.01__s0" and ready[0].stage == "lm_tune"
  waiting = {(r.stage, r.name) for r in runs if r.cfg is None}
  assert ("lm_test", "char_lm__nysact-graft__s0") in waiting
  assert ("vit_test", "fmnist_vit__nysact-graft__s2") in waiting
  muon = next(r for r in ready if r.name == "char_lm__muon__s0" and r.stage == "lm5_test")
  assert (
    muon.cfg.steps == 1500 and muon.cfg.lr == 0.05 and muon.cfg.adam_ratio == pytest.approx(0.05)
  )


def test_error_tracker_uses_the_layers_relative_damping():
  # With relative_damping=True a layer's rho is damping * damping_scale: the
  # tracker must compare against the exact inverse at that rho.
  from nysact_optax import NysActLayerState

  rng = np.random.default_rng(0)
  a = rng.normal(size=(40, 6))
  c = a.T @ a / 40
  lam, v = np.linalg.eigh(c)
  basis, eigvals = v[:, -2:], lam[-2:]  # a rank-2 approximation: error depends on rho

  def error(damping, scale):
    tracker = train.ErrorTracker(train.RunConfig(task="digits", damping=damping), "layer")
    tracker.snapshot = c
    ls = NysActLayerState(
      sketch_key=np.zeros(2, np.uint32),
      cov=np.zeros((6, 2)),
      basis=basis,
      eigvals=eigvals,
      damping_scale=np.float32(scale),
      stat_count=0,
      failures=0,
      stat_skips=0,
    )
    return tracker.error(ls)["rel_fro"]

  assert error(0.1, 4.0) == pytest.approx(error(0.4, 1.0), rel=1e-6)
  assert abs(error(0.1, 4.0) - error(0.1, 1.0)) > 1e-3


def test_run_config_round_trips_through_its_json():
  cfg = train.RunConfig(
    task="digits",
    optimizer="nysact",
    nysact=(("rank", 5), ("sketch", "subcolumns")),
    model=(("features", (4, 8)),),
    kfac_periods=(3, 30),
  )
  back = train.RunConfig.from_json(json.loads(json.dumps(cfg.to_json())))
  assert back.to_json() == cfg.to_json()
  assert back.nysact == cfg.nysact and back.model == cfg.model and back.kfac_periods == (3, 30)
