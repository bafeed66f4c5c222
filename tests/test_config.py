"""CompressConfig: validation of every option, defaults, JSON round trip, module-name patterns."""

from __future__ import annotations

import json
import math

import pytest

from rankcut.config import CONFIG_VERSION, CompressConfig, check_pattern, pattern_matches

BAD_FRACTIONS = [0, 0.0, -0.1, 1.5, 1.0000001, math.nan, math.inf, -math.inf, True, False, "0.5", None]


@pytest.mark.parametrize("key", ["keep", "energy"])
@pytest.mark.parametrize("value", [v for v in BAD_FRACTIONS if v is not None])
def test_fraction_outside_unit_interval_rejected(key, value):
    with pytest.raises(ValueError, match=key):
        CompressConfig(method="svd", **{key: value})


@pytest.mark.parametrize("key", ["keep", "energy"])
@pytest.mark.parametrize("value", [1e-9, 0.5, 1, 1.0])
def test_fraction_inside_unit_interval_accepted(key, value):
    cfg = CompressConfig(method="svd", **{key: value})
    assert getattr(cfg, key) == value
    assert cfg.rule == {key: value}
    assert cfg.allocation == {"keep": "uniform", "energy": "energy"}[key]


@pytest.mark.parametrize("value", [0, -1, -100])
def test_rank_below_one_rejected(value):
    with pytest.raises(ValueError, match=r"rank must be >= 1"):
        CompressConfig(method="svd", rank=value)


@pytest.mark.parametrize("value", [2.0, 1.5, "4", True, math.nan])
def test_rank_not_an_integer_rejected(value):
    with pytest.raises(ValueError, match=r"rank must be an integer"):
        CompressConfig(method="svd", rank=value)


def test_rank_accepted():
    cfg = CompressConfig(method="svd", rank=7)
    assert cfg.rank == 7 and cfg.keep is None and cfg.energy is None
    assert cfg.rule == {"rank": 7} and cfg.allocation == "rank"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep": 0.5, "energy": 0.9},
        {"keep": 0.5, "rank": 4},
        {"energy": 0.9, "rank": 4},
        {"keep": 0.5, "energy": 0.9, "rank": 4},
    ],
)
def test_more_than_one_allocation_rejected(kwargs):
    with pytest.raises(ValueError, match=r"only one of keep, energy, rank"):
        CompressConfig(method="svd", **kwargs)


def test_default_allocation_is_keep_0_8():
    cfg = CompressConfig()
    assert cfg.keep == 0.8
    assert cfg.energy is None and cfg.rank is None
    assert cfg.rule == {"keep": 0.8} and cfg.allocation == "uniform"
    assert cfg.method == "whiten"
    assert cfg.version == CONFIG_VERSION


def test_unknown_method_lists_known_methods():
    with pytest.raises(ValueError) as info:
        CompressConfig(method="qr-magic")
    message = str(info.value)
    assert "qr-magic" in message
    for name in ("svd", "asvd", "whiten"):
        assert name in message


def test_unknown_solver():
    with pytest.raises(ValueError, match=r"unknown solver 'lanczoz'.*exact, randomized"):
        CompressConfig(method="svd", options={"solver": "lanczoz"})


def test_unknown_sampling():
    with pytest.raises(ValueError, match=r"unknown sampling 'middle'.*random, first"):
        CompressConfig(method="svd", sampling="middle")


def test_unknown_svd_dtype():
    with pytest.raises(ValueError, match=r"svd_dtype"):
        CompressConfig(method="svd", options={"svd_dtype": "float16"})


@pytest.mark.parametrize("pattern", ["re:mlp.(", "re:[unclosed", "re:*bad"])
def test_invalid_regex_in_override_rejected(pattern):
    with pytest.raises(ValueError, match=r"invalid regular expression"):
        CompressConfig(method="svd", overrides={pattern: {"keep": 0.5}})


@pytest.mark.parametrize("field", ["include", "exclude"])
def test_invalid_regex_in_include_exclude_rejected(field):
    with pytest.raises(ValueError, match=r"invalid regular expression"):
        CompressConfig(method="svd", **{field: ["re:(a"]})


def test_empty_pattern_rejected():
    with pytest.raises(ValueError, match=r"non-empty string"):
        CompressConfig(method="svd", overrides={"": {"keep": 0.5}})
    with pytest.raises(ValueError, match=r"non-empty string"):
        check_pattern(3)  # type: ignore[arg-type]


def test_override_with_unknown_key_rejected():
    with pytest.raises(ValueError) as info:
        CompressConfig(method="svd", overrides={"re:q_proj": {"keep": 0.5, "ratio": 0.2}})
    message = str(info.value)
    assert "re:q_proj" in message and "ratio" in message


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"keep": 1.5}, r"keep must be in \(0, 1\]"),
        ({"energy": 0.0}, r"energy must be in \(0, 1\]"),
        ({"rank": 0}, r"rank must be >= 1"),
        ({"rank": 2.5}, r"rank must be an integer"),
        ({"keep": 0.5, "rank": 3}, r"only one of"),
        ({"keep": 0.5, "dense": True}, r"only one of"),
    ],
)
def test_override_with_bad_values_rejected(spec, match):
    with pytest.raises(ValueError, match=match):
        CompressConfig(method="svd", overrides={"layer.0": spec})


@pytest.mark.parametrize("spec", [{}, 0.5, None, [("keep", 0.5)]])
def test_override_must_be_nonempty_dict(spec):
    with pytest.raises(ValueError, match=r"non-empty dict"):
        CompressConfig(method="svd", overrides={"layer.0": spec})


def test_sequential_needs_layerwise():
    with pytest.raises(ValueError, match=r"sequential.*layerwise"):
        CompressConfig(method="svd", sequential=True, layerwise=False)
    cfg = CompressConfig(method="svd", sequential=True, layerwise=True)
    assert cfg.sequential


def test_newer_version_rejected():
    with pytest.raises(ValueError, match=rf"version {CONFIG_VERSION + 1} is newer"):
        CompressConfig(method="svd", version=CONFIG_VERSION + 1)
    assert CompressConfig(method="svd", version=CONFIG_VERSION).version == CONFIG_VERSION


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"options": {"oversample": -1}}, "oversample"),
        ({"options": {"power_iters": 1.5}}, "power_iters"),
        ({"calib_samples": 0}, "calib_samples"),
        ({"batch_size": 0}, "batch_size"),
        ({"seq_len": 0}, "seq_len"),
        ({"seed": -1}, "seed"),
        ({"method": "asvd", "options": {"alpha": -0.5}}, "alpha"),
        ({"method": "asvd", "options": {"alpha": math.nan}}, "alpha"),
        ({"method": "whiten", "options": {"damping": 0.0}}, "damping"),
    ],
)
def test_numeric_settings_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressConfig(**{"method": "svd", **kwargs})


@pytest.mark.parametrize("method, option", [("svd", "alpha"), ("whiten", "alpha"), ("asvd", "damping"),
                                            ("svd", "colour")])
def test_option_a_method_does_not_take_is_an_error(method, option):
    """Per-method config: an option the method does not have is an error naming its options, never dropped."""
    with pytest.raises(ValueError, match=rf"method '{method}' has no option\(s\) {option} \(its options: solver"):
        CompressConfig(method=method, options={option: 0.5})


def test_options_become_the_method_dataclass():
    from rankcut.methods.asvd import ASVDConfig
    from rankcut.methods.whiten import WhitenConfig

    cfg = CompressConfig(method="asvd", options={"alpha": 0.25, "solver": "randomized"})
    assert cfg.options == ASVDConfig(alpha=0.25, solver="randomized")
    assert CompressConfig(method="whiten", options=WhitenConfig(damping=1e-3)).options.damping == 1e-3
    with pytest.raises(ValueError, match=r"takes WhitenConfig, got ASVDConfig"):
        CompressConfig(method="whiten", options=ASVDConfig())
    assert CompressConfig(method="svd").to_dict()["options"] == {
        "solver": "exact", "oversample": 16, "power_iters": 2, "svd_dtype": "float32"}


def test_allocation_names_a_registered_policy():
    with pytest.raises(ValueError, match=r"unknown allocation 'magic'; choose one of energy, plan, rank, .*uniform"):
        CompressConfig(allocation="magic")
    with pytest.raises(ValueError, match=r"allocation uniform takes keep"):
        CompressConfig(allocation="uniform", rank=4)
    with pytest.raises(ValueError, match=r"allocation energy needs energy"):
        CompressConfig(allocation="energy")
    assert CompressConfig(allocation="uniform").keep == 0.8


def test_version_1_dict_is_migrated():
    """A format-1 checkpoint's config (every method option at the top level) reads as version 2: the options
    the method has move into its dataclass, the others (which version 1 ignored) are dropped."""
    v1 = {"method": "asvd", "keep": 0.6, "energy": None, "rank": None, "overrides": {}, "include": [], "exclude": [],
          "solver": "randomized", "oversample": 8, "power_iters": 3, "alpha": 0.25, "damping": 1e-4,
          "svd_dtype": "float64", "calib_samples": 16, "seq_len": 64, "seed": 7, "sampling": "first",
          "batch_size": 2, "layerwise": True, "sequential": False, "version": 1}
    cfg = CompressConfig.from_dict(v1)
    assert cfg.version == CONFIG_VERSION == 2
    assert cfg.options.to_dict() == {"solver": "randomized", "oversample": 8, "power_iters": 3,
                                     "svd_dtype": "float64", "alpha": 0.25}
    assert (cfg.keep, cfg.allocation, cfg.calib_samples, cfg.seed) == (0.6, "uniform", 16, 7)


def _rich_config() -> CompressConfig:
    return CompressConfig(
        method="asvd",
        energy=0.95,
        overrides={"re:mlp\\.down_proj": {"keep": 0.9}, "model.layers.0.self_attn.q_proj": {"dense": True}},
        include=["re:layers\\.\\d+\\."],
        exclude=["lm_head"],
        options={"solver": "randomized", "oversample": 8, "power_iters": 3, "alpha": 0.25, "svd_dtype": "float64"},
        calib_samples=16,
        seq_len=64,
        seed=7,
        sampling="first",
        batch_size=2,
        layerwise=True,
        sequential=True,
    )


@pytest.mark.parametrize("cfg", [CompressConfig(), CompressConfig(method="svd", rank=3), _rich_config()])
def test_json_round_trip(cfg):
    data = json.loads(json.dumps(cfg.to_dict()))
    again = CompressConfig.from_dict(data)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    # the override order (first match wins) survives the round trip
    assert list(again.overrides) == list(cfg.overrides)


def test_to_dict_is_a_copy():
    cfg = _rich_config()
    data = cfg.to_dict()
    data["overrides"]["re:mlp\\.down_proj"]["keep"] = 0.1
    data["include"].append("x")
    assert cfg.overrides["re:mlp\\.down_proj"]["keep"] == 0.9
    assert cfg.include == ["re:layers\\.\\d+\\."]


def test_from_dict_missing_fields_take_defaults():
    cfg = CompressConfig.from_dict({"method": "svd"})
    assert cfg == CompressConfig(method="svd")
    assert cfg.keep == 0.8


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown CompressConfig field\(s\): \['colour', 'ratio'\]"):
        CompressConfig.from_dict({"method": "svd", "ratio": 0.2, "colour": "red"})


def test_from_dict_validates():
    with pytest.raises(ValueError, match="keep"):
        CompressConfig.from_dict({"method": "svd", "keep": 2.0})
    with pytest.raises(ValueError, match="newer"):
        CompressConfig.from_dict({"version": CONFIG_VERSION + 5})


@pytest.mark.parametrize(
    "pattern, name, expected",
    [
        ("model.layers.0.mlp", "model.layers.0.mlp", True),
        ("model.layers.0.mlp", "model.layers.0.mlp.down_proj", False),  # exact means whole name
        ("layers.0", "model.layers.0.mlp", False),
        ("model.layers.1", "model.layers.10", False),
        ("re:layers.0", "model.layers.0.mlp", True),  # regex is searched anywhere
        ("re:^layers", "model.layers.0.mlp", False),
        ("re:down_proj$", "model.layers.3.mlp.down_proj", True),
        ("re:layers\\.1\\.", "model.layers.10.mlp", False),
        ("re:layers\\.1\\.", "model.layers.1.mlp", True),
        ("re:q_proj|k_proj", "attn.k_proj", True),
        ("q_proj|k_proj", "q_proj", False),  # no regex without the prefix
        ("re:", "anything", True),
    ],
)
def test_pattern_matches(pattern, name, expected):
    assert pattern_matches(pattern, name) is expected
