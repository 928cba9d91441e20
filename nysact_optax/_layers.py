"""What a preconditioned layer is: its input spec and how its kernel is laid out.

A covered layer computes ``y = A @ K.reshape(p_in, o) (+ b)``, where ``A`` holds one
input row per output position. :class:`DenseSpec`, :class:`ConvSpec` and
:class:`EinsumSpec` say how to obtain ``A`` (or products with it) from the raw
layer input and which kernel axes meet it, and :class:`LayerInputs` carries the
raw inputs of every call of one layer, with its spec as static pytree
metadata, from the forward pass to the optimizer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax

__all__ = ["ConvSpec", "DenseSpec", "EinsumSpec", "LayerInputs", "LayerSpec"]


@dataclasses.dataclass(frozen=True)
class DenseSpec:
  """A (general) dense layer: ``axis`` of the input are contracted with the
  leading kernel axes, in that order; every other input axis is a row axis.

  Attributes:
    axis: the contracted input axes (negative or non-negative).

  Examples:
    >>> spec = DenseSpec(axis=(-2, -1))  # e.g. DenseGeneral(axis=(-2, -1))
    >>> spec.input_width((7, 3, 4)), spec.kernel_input_axes
    (12, (0, 1))
  """

  axis: tuple[int, ...] = (-1,)

  @property
  def num_input_axes(self) -> int:
    return len(self.axis)

  @property
  def kernel_input_axes(self) -> tuple[int, ...]:
    return tuple(range(len(self.axis)))

  def input_width(self, x_shape: Sequence[int]) -> int:
    return math.prod(x_shape[a] for a in self.axis)


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """A convolution with channels-last inputs ``(*batch, *spatial, c_in)`` and a
  kernel ``(*kernel_size, c_in // groups, o)``, as ``flax.linen.Conv`` lays out.

  ``padding`` is ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``,
  ``'CAUSAL'`` or a tuple of ``(low, high)`` pairs.

  Examples:
    >>> spec = ConvSpec(kernel_size=(3, 3), strides=(1, 1), padding="SAME",
    ...                 input_dilation=(1, 1), kernel_dilation=(1, 1))
    >>> spec.input_width((16, 28, 28, 8))  # p = 3 * 3 * c_in (+1 with a bias)
    72
  """

  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: str | tuple[tuple[int, int], ...]
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  feature_group_count: int = 1

  @property
  def num_input_axes(self) -> int:
    return len(self.kernel_size) + 1

  @property
  def kernel_input_axes(self) -> tuple[int, ...]:
    return tuple(range(len(self.kernel_size) + 1))

  def input_width(self, x_shape: Sequence[int]) -> int:
    return math.prod(self.kernel_size) * (x_shape[-1] // self.feature_group_count)


def _einsum_labels(term: str) -> tuple[str, str | None]:
  """``(before, after)`` the ellipsis of one einsum operand; ``after`` is
  ``None`` without an ellipsis."""
  if "..." in term:
    before, after = term.split("...")
    return before, after
  return term, None


@dataclasses.dataclass(frozen=True)
class EinsumSpec:
  """An einsum layer ``y = einsum(equation, x, kernel)`` (``nn.Einsum``).

  Labels shared by the input and the kernel and absent from the output are
  contracted: they are the kernel's input axes (``A``'s features, in kernel
  order); kernel labels that reach the output are its output axes; every other
  input label is a row axis. The bias (if any) is laid out in output order.

  Attributes:
    equation: ``"<input>,<kernel>-><output>"`` without spaces; an ellipsis
      may stand for leading input/output axes, not for kernel axes.

  Examples:
    >>> spec = EinsumSpec("btd,ndh->btnh")  # kernel (heads, d_model, head_dim)
    >>> spec.axis, spec.kernel_input_axes, spec.bias_perm
    ((2,), (1,), (0, 1))
  """

  equation: str

  def __post_init__(self):
    eq = self.equation
    if eq.count("->") != 1 or eq.split("->")[0].count(",") != 1:
      raise ValueError(
        f"einsum equation {eq!r} must be explicit with two operands, 'input,kernel->output'"
      )
    (x, k), out = eq.split("->")[0].split(","), eq.split("->")[1]
    x_before, x_after = _einsum_labels(x)
    out_labels = "".join(l for l in _einsum_labels(out) if l)
    x_labels = x_before + (x_after or "")
    problems = []
    if "..." in k:
      problems.append("an ellipsis in the kernel")
    for name, labels in (("input", x_labels), ("kernel", k), ("output", out_labels)):
      if len(set(labels)) != len(labels):
        problems.append(f"a repeated label in the {name}")
    batch = [c for c in k if c in x_labels and c in out_labels]
    if batch:
      problems.append(
        f"labels {''.join(batch)!r} in input, kernel and output (one kernel "
        "slice per index, i.e. several layers in one kernel)"
      )
    summed = [c for c in k if c not in x_labels and c not in out_labels]
    summed += [c for c in x_labels if c not in k and c not in out_labels]
    if summed:
      problems.append(f"labels {''.join(summed)!r} summed over without the kernel")
    if not any(c in x_labels for c in k):
      problems.append("no contracted label")
    if problems:
      raise NotImplementedError(
        f"einsum {eq!r} is not a dense layer NysAct can precondition: it has " + "; ".join(problems)
      )

  def _parts(self):
    lhs, out = self.equation.split("->")
    x, k = lhs.split(",")
    return x, k, out

  @property
  def axis(self) -> tuple[int, ...]:
    """The contracted input axes, in kernel order (negative after an ellipsis)."""
    x, k, _ = self._parts()
    before, after = _einsum_labels(x)

    def position(c):
      if c in before or after is None:
        return before.index(c)
      return after.index(c) - len(after)

    return tuple(position(c) for c in k if c in before + (after or ""))

  @property
  def num_input_axes(self) -> int:
    return len(self.kernel_input_axes)

  @property
  def kernel_input_axes(self) -> tuple[int, ...]:
    x, k, _ = self._parts()
    return tuple(i for i, c in enumerate(k) if c in x)

  @property
  def bias_perm(self) -> tuple[int, ...]:
    """Transposes the bias (output order) to the kernel's output-axis order."""
    x, k, out = self._parts()
    bias_labels = [c for c in out if c in k]
    return tuple(bias_labels.index(c) for c in k if c not in x)

  def input_width(self, x_shape: Sequence[int]) -> int:
    return math.prod(x_shape[a] for a in self.axis)


@dataclasses.dataclass(frozen=True)
class Unsupported:
  """A layer the capture saw but cannot precondition; ``reason`` says why.

  Its :class:`LayerInputs` holds no inputs. The optimizer raises
  ``NotImplementedError`` with the reason unless the layer is excluded.
  """

  reason: str
  axis = ()
  kernel_input_axes = ()
  num_input_axes = 0

  def input_width(self, x_shape: Sequence[int]) -> int:
    return 0


LayerSpec = DenseSpec | ConvSpec | EinsumSpec | Unsupported


@jax.tree_util.register_pytree_node_class
class LayerInputs:
  """The inputs of every call of one layer in a forward pass.

  A pytree whose leaves are the input arrays (one per call) and whose static
  metadata is the layer's :class:`DenseSpec`, :class:`ConvSpec` or
  :class:`EinsumSpec` (and the kernel shape the module saw).
  :func:`nysact_optax.capture_activations` builds these; you rarely make one
  by hand, except to feed statistics from a custom layer.

  Attributes:
    inputs: tuple of input arrays, one per call of the layer. For a layer
      stacked by ``nn.scan``/``nn.vmap`` each array has the stack axes first.
    spec: how those inputs meet the kernel.
    kernel_shape: the kernel's shape as the module saw it (without stack
      axes), or ``None`` when unknown; used to check the parameter tree.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, nysact_optax
    >>> model = nn.Sequential([nn.Conv(4, (3, 3)), nn.Dense(2)])
    >>> variables = model.init(jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 1)))
    >>> _, acts = nysact_optax.capture_activations(model.apply)(variables, jnp.ones((5, 8, 8, 1)))
    >>> acts["layers_0"].inputs[0].shape, acts["layers_0"].kernel_shape
    ((5, 8, 8, 1), (3, 3, 1, 4))
    >>> acts["layers_1"].spec
    DenseSpec(axis=(-1,))
  """

  def __init__(
    self,
    inputs: Sequence[Any],
    spec: LayerSpec,
    kernel_shape: tuple[int, ...] | None = None,
  ):
    self.inputs = tuple(inputs)
    self.spec = spec
    self.kernel_shape = None if kernel_shape is None else tuple(kernel_shape)

  def tree_flatten(self):
    return self.inputs, (self.spec, self.kernel_shape)

  @classmethod
  def tree_unflatten(cls, aux, inputs):
    return cls(inputs, *aux)

  def __repr__(self) -> str:
    shapes = ", ".join(str(getattr(x, "shape", "?")) for x in self.inputs)
    return f"LayerInputs(inputs=[{shapes}], spec={self.spec})"


def int_tuple(x: Any, n: int) -> tuple[int, ...]:
  """``x`` (an int, ``None`` meaning 1, or a sequence) as ``n`` ints."""
  if x is None:
    x = 1
  return (int(x),) * n if isinstance(x, int) else tuple(int(v) for v in x)
