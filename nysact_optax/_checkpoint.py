"""Checkpointing the optimizer state with orbax, and refusing a mismatched one.

The state is plain arrays (the sketches are stored as their PRNG keys), so
an orbax round trip restores it bit for bit and a resumed run repeats the
uninterrupted one exactly, between or across factor refreshes. Restoring
into a state built for another model or another ``rank`` fails with an error
that names the layers and shapes that differ, before anything is read.

Needs the ``checkpoint`` extra (``orbax-checkpoint``).
"""

from __future__ import annotations

import os
from typing import Any

import jax

from nysact_optax import _tree
from nysact_optax._state import ScaleByNysActState, nysact_states_with_path

__all__ = ["restore_checkpoint", "save_checkpoint"]


def _orbax():
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
      "nysact_optax checkpoints need orbax-checkpoint: pip install 'nysact-optax[checkpoint]'"
    ) from e
  return ocp


def save_checkpoint(directory: str | os.PathLike, tree: Any, *, force: bool = False) -> None:
  """Writes ``tree`` (e.g. ``{"params": ..., "opt_state": ...}``) with orbax.

  Blocks until the checkpoint is complete. Sharded arrays are written by the
  processes that hold them (orbax's ``StandardCheckpointer``).

  Args:
    directory: a new directory (absolute, or relative to the working
      directory).
    tree: a pytree of arrays, such as a NysAct optimizer state.
    force: overwrite an existing checkpoint at ``directory``.

  Examples:
    >>> import tempfile, jax.numpy as jnp, nysact_optax
    >>> tx = nysact_optax.nysact(0.1, rank=2)
    >>> state = tx.init({"dense": {"kernel": jnp.ones((3, 2))}})
    >>> path = tempfile.mkdtemp() + "/step_5"
    >>> nysact_optax.save_checkpoint(path, {"opt_state": state})
    >>> back = nysact_optax.restore_checkpoint(path, {"opt_state": state})
    >>> back["opt_state"][0].layers["dense"].cov.shape
    (3, 2)
  """
  ocp = _orbax()
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(directory), tree, force=force)
    checkpointer.wait_until_finished()


def _keys(path) -> tuple[str, ...]:
  return tuple(_tree.key_name(k) for k in path)


def _show(keys: tuple[str, ...]) -> str:
  return "".join(f"[{k!r}]" for k in keys)


def _nysact_states(target: Any) -> dict[tuple[str, ...], ScaleByNysActState]:
  return {_keys(path): state for path, state in nysact_states_with_path(target)}


def _mismatches(saved: dict[tuple[str, ...], tuple[int, ...]], target: Any) -> list[str]:
  """Human-readable differences between saved shapes and ``target``."""
  wanted = {
    _keys(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]
  }
  problems = []
  covered = set()
  for prefix, state in _nysact_states(target).items():
    layers_key = prefix + ("layers",)
    in_ckpt = {k[len(layers_key)] for k in saved if k[: len(layers_key)] == layers_key}
    in_target = set(state.layers)
    where = _show(prefix) or "the root"
    if in_ckpt != in_target:
      problems.append(
        f"the NysAct state at {where} preconditions different layers: "
        f"only in the checkpoint: {sorted(in_ckpt - in_target)}, only in the "
        f"target: {sorted(in_target - in_ckpt)} (a different model, or "
        "different exclude=/input_axes=?)"
      )
    for name in sorted(in_ckpt & in_target):
      for field in ("cov", "basis", "eigvals"):
        key = layers_key + (name, field)
        got, want = saved.get(key), wanted.get(key)
        if got is not None and want is not None and got != want:
          problems.append(
            f"layer {name!r}: {field} has shape {got} in the checkpoint but "
            f"{want} in the target (p, rank): the checkpoint was written with "
            f"rank {got[-1]}, the target expects rank {want[-1]}"
            + (
              ""
              if got[:1] == want[:1] or field == "eigvals"
              else f" and input width p={got[0]}, not p={want[0]}"
            )
          )
    covered |= {k for k in set(saved) | set(wanted) if k[: len(layers_key)] == layers_key}
  for key in sorted((set(saved) | set(wanted)) - covered):
    if key not in wanted:
      problems.append(f"{_show(key)} is in the checkpoint but not in the target")
    elif key not in saved:
      problems.append(f"{_show(key)} is in the target but not in the checkpoint")
    elif saved[key] != wanted[key]:
      problems.append(
        f"{_show(key)} has shape {saved[key]} in the checkpoint but {wanted[key]} in the target"
      )
  return problems


def restore_checkpoint(directory: str | os.PathLike, target: Any) -> Any:
  """Reads a checkpoint written by :func:`save_checkpoint` into ``target``'s layout.

  ``target`` is a tree like the saved one (e.g. a fresh ``tx.init(params)``);
  its structure, shapes, dtypes and shardings are those of the result. The
  saved shapes are checked first: a NysAct state with other layers, another
  rank or another input width is refused with every difference named.

  Args:
    directory: the checkpoint directory.
    target: a pytree of arrays (or ``jax.ShapeDtypeStruct`` with shardings).

  Returns:
    The restored tree, with ``target``'s structure.

  Raises:
    ValueError: if the checkpoint does not fit ``target``.

  Examples:
    >>> import tempfile, jax.numpy as jnp, nysact_optax
    >>> params = {"dense": {"kernel": jnp.ones((3, 2))}}
    >>> tx = nysact_optax.nysact(0.1, rank=2)
    >>> path = tempfile.mkdtemp() + "/step_0"
    >>> nysact_optax.save_checkpoint(path, {"params": params, "opt_state": tx.init(params)})
    >>> target = {"params": params, "opt_state": tx.init(params)}  # e.g. a fresh state
    >>> back = nysact_optax.restore_checkpoint(path, target)
    >>> back["opt_state"][0].layers["dense"].basis.shape
    (3, 2)
    >>> other_rank = nysact_optax.nysact(0.1, rank=1).init(params)
    >>> nysact_optax.restore_checkpoint(path, {"params": params, "opt_state": other_rank})
    Traceback (most recent call last):
    ...
    ValueError: the checkpoint at ... does not fit the target state:
      - layer 'dense': cov has shape (3, 2) in the checkpoint but (3, 1) in the target ...
    ...
  """
  ocp = _orbax()
  directory = os.path.abspath(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.metadata(directory).item_metadata.tree
    saved = {
      _keys(path): tuple(leaf.shape)
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
      if hasattr(leaf, "shape")
    }
    problems = _mismatches(saved, target)
    if problems:
      raise ValueError(
        f"the checkpoint at {directory} does not fit the target state:\n  - "
        + "\n  - ".join(problems)
      )
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return checkpointer.restore(directory, abstract)
