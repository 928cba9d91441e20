"""NysAct for JAX and Optax: Nyström-approximated activation-covariance
preconditioning (Seung, Lee, Ko, IEEE BigData 2024; arXiv:2506.08360)."""

from nysact_optax import linalg
from nysact_optax._accumulate import GradsWithStatistics, sketched_statistics
from nysact_optax._adam import ScaleByNysActAdamState, scale_by_nysact_adam
from nysact_optax._alias import nysact, nysact_adam
from nysact_optax._checkpoint import restore_checkpoint, save_checkpoint
from nysact_optax._diagnostics import LayerDiagnostics, diagnostics
from nysact_optax._graft import GraftState, graft, preconditioned_mask
from nysact_optax._layers import ConvSpec, DenseSpec, EinsumSpec, LayerInputs
from nysact_optax._muon import muon_dimension_numbers
from nysact_optax._state import NysActLayerState, ScaleByNysActState, find_nysact_state
from nysact_optax._transform import scale_by_nysact

__version__ = "0.2.0"


def __getattr__(name: str):
  # The captures, TrainState and value_and_grad are the only parts that need
  # flax; import them on first use, so that the optimizer and its math load
  # without flax (tests/test_paths.py).
  if name == "capture_activations":
    from nysact_optax._capture import capture_activations

    return capture_activations
  if name in ("TrainState", "apply_gradients"):
    from nysact_optax import _train_state

    return getattr(_train_state, name)
  if name in ("grad", "value_and_grad"):
    from nysact_optax import _grad

    return getattr(_grad, name)
  raise AttributeError(f"module 'nysact_optax' has no attribute {name!r}")


__all__ = [
  "ConvSpec",
  "DenseSpec",
  "EinsumSpec",
  "GradsWithStatistics",
  "GraftState",
  "LayerDiagnostics",
  "LayerInputs",
  "NysActLayerState",
  "ScaleByNysActAdamState",
  "ScaleByNysActState",
  "TrainState",
  "apply_gradients",
  "capture_activations",
  "diagnostics",
  "find_nysact_state",
  "grad",
  "graft",
  "linalg",
  "muon_dimension_numbers",
  "nysact",
  "nysact_adam",
  "preconditioned_mask",
  "restore_checkpoint",
  "save_checkpoint",
  "scale_by_nysact",
  "scale_by_nysact_adam",
  "sketched_statistics",
  "value_and_grad",
]
