"""Issue 11 ("never worse than plain torch.compile"): a mistake is an error naming it,
raised where it is made, not a wrapped or deferred one."""

import pytest
import torch

import adacorr_compile


def test_bad_option_surfaces_as_the_valueerror_naming_it():
    """Options reach the backend only at the first call (torch.compile looks the backend up
    by name and keeps the options for the call); there the user reads the ValueError
    itself, not Dynamo's BackendCompilerFailed around it."""
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="adacorr", options={"gamma": -1})
    for _ in range(2):  # and again on the next call
        with pytest.raises(ValueError) as err:
            compiled(torch.randn(2, 4))
        assert not isinstance(err.value, torch._dynamo.exc.BackendCompilerFailed)
        assert str(err.value).splitlines()[0] == "adacorr option 'gamma' got -1 (int); expected a number >= 0"


@pytest.mark.parametrize("bad", ["20", 0, -3, 2.5, True])
def test_num_steps_is_checked_at_the_call(bad):
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="adacorr")
    expected = rf"num_steps got {bad!r}: expected None \(unknown\) or an int >= 1"
    with pytest.raises(ValueError, match=expected):
        adacorr_compile.generation(compiled, num_steps=bad)  # no `with`: the call itself raises
    with pytest.raises(ValueError, match=expected):
        adacorr_compile.reset(compiled, num_steps=bad)


def test_num_steps_accepts_none_and_ints():
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="adacorr")
    with adacorr_compile.generation(compiled, num_steps=3) as state:
        assert state.num_steps == 3
    with adacorr_compile.generation(compiled) as state:
        assert state.num_steps is None
    adacorr_compile.reset(compiled, num_steps=5)
    adacorr_compile.reset(compiled)
