import pytest
import torch

from adacorr_compile import AdaCorrConfig


def test_defaults_are_valid_and_frozen():
    cfg = AdaCorrConfig()
    assert cfg.gamma == 1.0 and cfg.spatial_weight == 1.0 and cfg.lowering == "inductor"
    with pytest.raises(Exception):
        cfg.gamma = 2.0  # frozen


def test_from_options_sets_fields():
    cfg = AdaCorrConfig.from_options({"gamma": 2.0, "policy": "interval", "interval": 4, "lowering": "eager"})
    assert (cfg.gamma, cfg.policy, cfg.interval, cfg.lowering) == (2.0, "interval", 4, "eager")
    assert AdaCorrConfig.from_options(None) == AdaCorrConfig()


@pytest.mark.parametrize(
    "key,value",
    [
        ("gamma", -1.0),
        ("gamma", "big"),
        ("spatial_weight", -0.5),
        ("score", "fancy"),
        ("policy", "sometimes"),
        ("correction", "yes"),
        ("reuse_threshold", 1.5),
        ("blend", 1),
        ("interval", 0),
        ("interval", 2.5),
        ("warmup_steps", -1),
        ("max_consecutive_reuses", True),
        ("decision", "token"),
        ("scope", "layer"),
        ("forecast", "quadratic"),
        ("forecast_max_change", -0.1),
        ("forecast_max_change", float("nan")),
        ("probe_forecast", 1),
        ("late_phase", (0.5, 0.2)),
        ("late_phase", (0.2, 1.5)),
        ("late_phase", 0.5),
        ("late_threshold_factor", 0),
        ("late_threshold_factor", float("inf")),
        ("late_extra_reuses", -1),
        ("lowering", "xla"),
        ("inductor_mode", "turbo"),
        ("timestep_arg", "not an identifier"),
        ("drift_reference", "yesterday"),
    ],
)
def test_bad_value_names_the_option(key, value):
    with pytest.raises(ValueError) as err:
        AdaCorrConfig.from_options({key: value})
    msg = str(err.value)
    assert repr(key) in msg and repr(value) in msg and "expected" in msg


def test_late_phase_from_json_is_a_tuple_and_presets_turn_it_off():
    """A late_phase given as a list (load_options reads JSON) is kept as a tuple of floats, so
    the config stays hashable; the paper's skip preset has one threshold throughout."""
    cfg = AdaCorrConfig.from_options({"late_phase": [0, 1]})
    assert cfg.late_phase == (0.0, 1.0) and hash(cfg)
    assert AdaCorrConfig().late_phase == (0.2, 0.5)
    assert AdaCorrConfig.from_options({"preset": "paper-skip"}).late_phase is None


def test_unknown_option_lists_allowed():
    with pytest.raises(ValueError, match=r"unknown adacorr option 'gama'.*allowed options: .*gamma"):
        AdaCorrConfig.from_options({"gama": 1.0})


def test_bad_option_through_torch_compile_names_it():
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="adacorr", options={"reuse_threshold": 7})
    with pytest.raises(Exception, match="reuse_threshold"):
        compiled(torch.randn(2, 4))


def test_describe_covers_every_field():
    names = [r[0] for r in AdaCorrConfig.describe()]
    assert names == [f for f in AdaCorrConfig.__dataclass_fields__]
