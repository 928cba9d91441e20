"""The main job's pieces: a real training run on the bundled digits."""

import pytest

from nysact_optax import demo


@pytest.mark.parametrize("name", ["nysact", "nysact_adam"])
def test_nysact_modes_train_digits_cnn_to_95_percent(name):
  data = demo.load_digits_split()
  assert data.x_train.shape == (1437, 8, 8, 1) and data.x_test.shape == (360, 8, 8, 1)
  tx, needs = demo.optimizers(400)[name]
  result = demo.train(name, tx, needs, data, steps=400, seed=0)
  assert result.test_accuracy >= 0.95, result


def test_main_trains_every_mode_by_default():
  assert list(demo.optimizers(1500)) == ["sgd-momentum", "adamw", "nysact", "nysact_adam"]


def test_main_prints_a_table(capsys):
  results = demo.main(
    ["--steps", "30", "--seeds", "1", "--optimizers", "sgd-momentum", "nysact", "nysact_adam"]
  )
  assert [r.name for r in results] == ["sgd-momentum", "nysact", "nysact_adam"]
  out = capsys.readouterr().out
  assert "sgd-momentum" in out and "nysact_adam" in out and "state" in out
  assert results[2].state_bytes > results[1].state_bytes > results[0].state_bytes
