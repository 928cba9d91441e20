"""The settings table: checks with named errors, one options object, full docs."""

import inspect
import re

import jax.numpy as jnp
import pytest

import nysact_optax
from nysact_optax import _options

PUBLIC = (
  nysact_optax.scale_by_nysact,
  nysact_optax.nysact,
  nysact_optax.scale_by_nysact_adam,
  nysact_optax.nysact_adam,
)
ADAM = (nysact_optax.scale_by_nysact_adam, nysact_optax.nysact_adam)


def _build(fn, **kwargs):
  return (
    fn(1e-2, **kwargs) if fn in (nysact_optax.nysact, nysact_optax.nysact_adam) else fn(**kwargs)
  )


@pytest.mark.parametrize("fn", PUBLIC)
def test_include_as_a_bare_string_is_refused(fn):
  # Before: include="Dense" was read letter by letter and selected Conv_0 too.
  message = (
    "include must be a list of regexes or a predicate on layer paths (a str would be "
    "read as one pattern per letter: write include=['...']), got include='Dense'"
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    _build(fn, include="Dense")


def test_include_list_selects_only_its_layers():
  params = {
    "Conv_0": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros(4)},
    "Dense_0": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
  }
  state = nysact_optax.scale_by_nysact(include=["Dense"]).init(params)
  assert list(state.layers) == ["Dense_0"]


@pytest.mark.parametrize("fn", PUBLIC)
@pytest.mark.parametrize(
  "kwargs, message",
  [
    (
      dict(stack_axes={"layers": -1}),
      "stack_axes must be a mapping from layer-path regexes to the number of leading "
      "kernel axes that index stacked copies (an integer >= 0), e.g. "
      "stack_axes={'layers': 1}, got stack_axes={'layers': -1}",
    ),
    (
      dict(stack_axes=1),
      "stack_axes must be a mapping from layer-path regexes to the number of leading "
      "kernel axes that index stacked copies (an integer >= 0), e.g. "
      "stack_axes={'layers': 1}, got stack_axes=1",
    ),
    (
      dict(axis_name=0),
      "axis_name must be None or the name of a mapped axis (a str, or a tuple of "
      "them), e.g. axis_name='batch', got axis_name=0",
    ),
  ],
)
def test_stack_axes_and_axis_name_are_checked(fn, kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    _build(fn, **kwargs)


@pytest.mark.parametrize("fn", ADAM)
def test_adam_checks_name_the_argument(fn):
  with pytest.raises(ValueError, match=re.escape("orthogonalise must be True or False")):
    _build(fn, orthogonalise="yes")
  with pytest.raises(ValueError, match=re.escape("oversample must be an integer >= 0")):
    _build(fn, oversample=-1)


def test_valid_values_pass():
  for kwargs in (dict(axis_name="batch"), dict(axis_name=("data", "model")), dict(stack_axes={})):
    nysact_optax.scale_by_nysact(**kwargs)


@pytest.mark.parametrize("fn", PUBLIC)
def test_every_argument_is_documented(fn):
  doc = inspect.getdoc(fn)
  args = doc[doc.index("Args:") : doc.index("Returns:")]
  documented = re.findall(r"^  (\w+):", args, flags=re.M)
  assert documented == list(inspect.signature(fn).parameters)
  assert "as are" not in args  # no argument documented by reference only


def test_options_carry_the_statistics_settings_only():
  options = _options.Options.build(dict(rank=3, damping=0.5, nystrom="shifted", seed=2))
  assert (options.rank, options.seed) == (3, 2)
  assert not hasattr(options, "damping") and not hasattr(options, "nystrom")


def test_forward_passes_only_what_the_callee_takes():
  kwargs = _options.forward(nysact_optax.scale_by_nysact, dict(rank=3, momentum=0.9))
  assert kwargs == {"rank": 3}
