"""Checking what reaches ``update``, with errors that name the layer, the argument and the value.

The state, the captured activations and precomputed statistics are checked
at every ``update`` (at trace time: shapes and structure only, nothing that
needs a value under ``jit``). The settings are checked once, when the
transformation is built, against the table of :mod:`nysact_optax._options`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from nysact_optax import _kinds, _layers, _tree

__all__ = ["check_activations", "check_state", "check_statistics", "exclude_pattern"]


def check_state(layers, state):
  """The state was made by ``init`` on a tree with these layers and shapes."""
  names = [layer.name for layer in layers]
  if set(state.layers) != set(names):
    raise ValueError(
      "the optimizer state does not match the updates: the state was "
      f"initialised for layers {sorted(state.layers)}, the updates have "
      f"layers {names} (only in the state: "
      f"{sorted(set(state.layers) - set(names))}; only in the updates: "
      f"{sorted(set(names) - set(state.layers))}). Call init on the params "
      "tree you update, with the same exclude= and input_axes=."
    )
  for layer in layers:
    shape = tuple(jnp.shape(state.layers[layer.name].cov))
    if shape != layer.stack_shape + (layer.p, layer.rank):
      raise ValueError(
        f"layer {layer.name!r}: the optimizer state holds statistics of "
        f"shape {shape}, but its kernel {layer.kernel_shape}"
        f"{' with bias' if layer.has_bias else ''} needs "
        f"{layer.stack_shape + (layer.p, layer.rank)}. Call init on the params tree you update."
      )


def _axes_hint(axes: tuple[int, ...]) -> int | tuple[int, ...]:
  return len(axes) if axes == tuple(range(len(axes))) else axes


def check_statistics(layers, statistics):
  """Precomputed statistics must cover exactly the layers, with ``(p, r)`` shapes."""
  names = {layer.name for layer in layers}
  if not isinstance(statistics, Mapping) or set(statistics) != names:
    got = sorted(statistics) if isinstance(statistics, Mapping) else type(statistics).__name__
    raise ValueError(
      f"statistics must map every layer to its sketched covariance: expected "
      f"layers {sorted(names)}, got {got}. Compute them with "
      "nysact_optax.sketched_statistics(opt_state, activations)."
    )
  for layer in layers:
    shape = tuple(jnp.shape(statistics[layer.name]))
    if shape != layer.stack_shape + (layer.p, layer.rank):
      raise ValueError(
        f"layer {layer.name!r}: statistics has shape {shape}, expected "
        f"{layer.stack_shape + (layer.p, layer.rank)} (p, rank). Compute them with "
        "nysact_optax.sketched_statistics from this optimizer's state."
      )


def check_activations(layers, activations, include=None, exclude=(), *, extra_ok=False):
  """The captured inputs of every layer, checked against the layouts.

  Layers whose kernel layout differs from what the captured module computes
  are reported together, in one error with the ``input_axes=`` to pass.
  With ``extra_ok``, activations of layers the optimizer does not
  precondition are ignored instead of refused.
  """
  if activations is None:
    if not layers:
      return {}
    raise ValueError(
      "scale_by_nysact.update needs activations=...: take the gradient with "
      "nysact_optax.value_and_grad(loss_fn) in place of jax.value_and_grad "
      "(it returns ((value, grads), activations)) and pass the activations "
      f"(layers expecting them: {[l.name for l in layers]}). flax's "
      "TrainState.apply_gradients cannot pass them: use "
      "nysact_optax.apply_gradients(state, grads=grads, activations=acts)"
    )
  table = _tree.activation_table(activations)
  known = {layer.name for layer in layers}
  for name in table:
    if not extra_ok and name not in known and _tree.selected(name, include, exclude):
      raise ValueError(
        f"activations were captured for layer {name!r}, which has no kernel "
        f"in the updates tree (layers there: {sorted(known)}). Pass the "
        "params tree of the same model (variables['params'])."
      )
  _check_uncaptured(layers, table)
  axes_wanted = {}
  for layer in layers:
    spec_axes = _check_layer_inputs(layer, table[layer.name])
    if spec_axes is not None:
      axes_wanted[layer.name] = (spec_axes, layer)
  if axes_wanted:
    lines = "; ".join(
      f"layer {name!r}: its input meets kernel axes {axes} of the kernel "
      f"{layer.layer_kernel_shape}, which was taken to have input axes "
      f"{layer.input_axes}"
      for name, (axes, layer) in axes_wanted.items()
    )
    fix = ", ".join(f"{name!r}: {_axes_hint(axes)}" for name, (axes, _) in axes_wanted.items())
    nnx_model = type(activations).__module__.startswith("flax.nnx")  # an nnx.State
    raise ValueError(
      f"{len(axes_wanted)} layer(s) have a kernel layout the parameter shapes "
      f"do not tell: {lines}. Pass input_axes={{{fix}}}"
      + (
        ", or the model itself: nysact(..., model=model) (or scale_by_nysact"
        "(..., model=model)) reads every NNX layer's layout off it."
        if nnx_model
        else "."
      )
    )
  return table


def exclude_pattern(names: Sequence[str]) -> str:
  """One regex for ``exclude=`` that matches exactly these layer paths.

  Examples:
    >>> exclude_pattern(["rnn/cell/ii", "rnn/cell/hi"])
    '^rnn/cell/(?:ii|hi)$'
    >>> exclude_pattern(["Conv_0"])  # one layer: its name, as elsewhere
    'Conv_0'
  """
  if len(names) == 1:
    return re.escape(names[0])
  parts = [name.split("/") for name in names]
  depth = 0  # the parent modules all of them share
  while all(len(p) > depth + 1 and p[depth] == parts[0][depth] for p in parts):
    depth += 1
  prefix = "".join(f"{p}/" for p in parts[0][:depth])
  rest = [re.escape(name[len(prefix) :]) for name in names]
  return f"^{re.escape(prefix)}(?:{'|'.join(rest)})$"


def _check_uncaptured(layers, table) -> None:
  """Every layer without usable inputs, in one error with one ``exclude=``."""
  why = {}
  for layer in layers:
    entry = table.get(layer.name)
    if entry is None:
      why[layer.name] = (
        f"no captured inputs (kernel {layer.kernel_shape}): no covered layer "
        "computed with this kernel; a module that computes its product itself "
        "is not covered (covered: "
        f"{', '.join(_kinds.covered_names('linen') + _kinds.covered_names('nnx'))})"
      )
    elif isinstance(entry.spec, _layers.Unsupported):
      why[layer.name] = entry.spec.reason
    elif not entry.inputs:
      why[layer.name] = (
        "it ran, but a lifted transform did not carry its inputs out: list "
        "'nysact_inputs' in its variable_axes, e.g. nn.scan(..., "
        "variable_axes={'params': 0, 'nysact_inputs': 0})"
      )
  if not why:
    return
  lines = "; ".join(f"layer {name!r}: {reason}" for name, reason in why.items())
  unsupported = all(
    isinstance(getattr(table.get(n), "spec", None), _layers.Unsupported) for n in why
  )
  pattern = exclude_pattern(list(why))
  raise (NotImplementedError if unsupported else ValueError)(
    f"NysAct cannot precondition {len(why)} layer(s) as captured: {lines}. "
    f"Activations hold layers {sorted(table)}. Take the gradient with "
    "nysact_optax.value_and_grad (or capture with "
    "nysact_optax.capture_activations), or leave "
    f"{'these layers' if len(why) > 1 else 'the layer'} to the plain gradient "
    f"with exclude=[{pattern!r}]."
  )


def _check_layer_inputs(layer: _tree.Layer, entry: Any) -> tuple[int, ...] | None:
  """One layer's captured inputs against its layout; returns the kernel input
  axes the module computes with when they differ from the layout's."""
  n_axes = entry.spec.num_input_axes
  for x in entry.inputs:
    shape = tuple(x.shape)
    if len(shape) < n_axes:
      raise ValueError(
        f"layer {layer.name!r}: its input of shape {shape} has fewer than "
        f"the {n_axes} axes its {type(entry.spec).__name__} contracts. "
        "Pass the activations that nysact_optax.capture_activations returns."
      )
    if n_axes >= len(layer.layer_kernel_shape):
      raise ValueError(
        f"layer {layer.name!r}: its input of shape {shape} comes from a "
        f"{type(entry.spec).__name__} that contracts {n_axes} kernel axes, "
        f"but its kernel {layer.kernel_shape} has "
        f"{len(layer.kernel_shape)} axes, so at most "
        f"{len(layer.kernel_shape) - 1} can meet the input. "
        "The activations must come from the forward pass of the model "
        "whose gradients you update."
      )
  seen = entry.kernel_shape
  if seen is not None and seen != layer.layer_kernel_shape:
    extra = len(layer.kernel_shape) - len(seen)
    if not layer.stack_axes and extra > 0 and layer.kernel_shape[extra:] == seen:
      raise ValueError(
        f"layer {layer.name!r} has a kernel of shape {layer.kernel_shape} in "
        f"the params, but the module computes with a kernel of shape {seen}: "
        "it is stacked by a lifted transform (nn.scan, nn.vmap). Pass "
        f"stack_axes={{{layer.name!r}: {extra}}}."
      )
    raise ValueError(
      f"layer {layer.name!r}: the module computes with a kernel of shape "
      f"{seen}, but the params have {layer.kernel_shape} with "
      f"stack_axes={layer.stack_axes}. Pass the params tree of the same "
      "model, and stack_axes= for layers under nn.scan/nn.vmap."
    )
  spec_axes = tuple(entry.spec.kernel_input_axes)
  if spec_axes != layer.input_axes:
    return spec_axes  # reported with every other such layer, in one error
  _check_bias_layout(layer, entry.spec)
  for x in entry.inputs:
    if tuple(x.shape[: layer.stack_axes]) != layer.stack_shape:
      raise ValueError(
        f"layer {layer.name!r} is stacked {layer.stack_shape} "
        f"(stack_axes={layer.stack_axes}), but a captured input has shape "
        f"{tuple(x.shape)}: the nn.scan/nn.vmap must stack the "
        "'nysact_inputs' collection like the params, e.g. "
        "variable_axes={'params': 0, 'nysact_inputs': 0}."
      )
    width = entry.spec.input_width(x.shape[layer.stack_axes :])
    if width != layer.p_in:
      raise ValueError(
        f"layer {layer.name!r}: its input of shape {tuple(x.shape)} has {width} "
        f"features, but its kernel {layer.kernel_shape} expects "
        f"{layer.p_in}. The activations must come from the forward pass "
        "of the model whose gradients you update (same params tree, same "
        "input feature size)."
      )
  return None


def _check_bias_layout(layer: _tree.Layer, spec: Any) -> None:
  """The bias order chosen from the shapes is the one the module computes with."""
  want = getattr(spec, "bias_perm", None)
  if not layer.has_bias or want is None or layer.bias_perm is None:
    return
  if tuple(want) != layer.bias_perm:
    raise ValueError(
      f"layer {layer.name!r}: its bias of shape {layer.bias_shape} is laid "
      f"out with axes {tuple(want)} matching the kernel's outputs, but the "
      f"shapes alone gave {layer.bias_perm} (its axis sizes repeat, so they "
      "cannot tell). NysAct cannot precondition this layer: exclude it with "
      f"exclude=[{layer.name!r}]."
    )
