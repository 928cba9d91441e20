"""The main job's pieces: a real training run on the bundled digits."""

from nysact_optax import demo


def test_nysact_trains_digits_cnn_to_95_percent():
  data = demo.load_digits_split()
  assert data.x_train.shape == (1437, 8, 8, 1) and data.x_test.shape == (360, 8, 8, 1)
  tx, needs = demo.optimizers(400)["nysact"]
  result = demo.train("nysact", tx, needs, data, steps=400, seed=0)
  assert result.test_accuracy >= 0.95, result


def test_main_prints_a_table(capsys):
  results = demo.main(["--steps", "30", "--seeds", "1", "--optimizers", "sgd-momentum", "nysact"])
  assert [r.name for r in results] == ["sgd-momentum", "nysact"]
  out = capsys.readouterr().out
  assert "sgd-momentum" in out and "nysact" in out and "state" in out
  assert results[1].state_bytes > results[0].state_bytes
