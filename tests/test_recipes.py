"""Recipes and presets: round trips through dict / YAML / JSON, and validation errors that name the
field at fault and suggest the closest valid value."""
import copy
import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcompile
from qcompile import (CalibrationConfig, LayerConfig, QuantSpec, Recipe, RecipeError, SmoothingConfig,
                      resolve_recipe)
from qcompile.formats import FORMATS
from qcompile.spec import OBSERVERS

PRESET_NAMES = qcompile.recipes()


# -- presets -------------------------------------------------------------------------------------
def test_presets_listed():
    assert {"w8a8", "w8a8-dynamic", "w8", "w4-g64", "w4-g128"} <= set(PRESET_NAMES)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_is_valid_and_fresh(name):
    r = Recipe.preset(name)
    assert r.validate() is r
    assert r.name == name
    assert Recipe.preset(name) == r and Recipe.preset(name) is not r


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_dict_round_trip(name):
    r = Recipe.preset(name)
    d = r.to_dict()
    assert Recipe.from_dict(d) == r
    assert Recipe.from_dict(copy.deepcopy(d)).to_dict() == d
    json.dumps(d)                                  # plain data only


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_preset_file_round_trip(name, suffix, tmp_path):
    r = Recipe.preset(name)
    path = tmp_path / f"recipe{suffix}"
    r.save(path)
    assert Recipe.load(path) == r
    assert Recipe.load(str(path)).to_dict() == r.to_dict()
    assert resolve_recipe(path) == r and resolve_recipe(str(path)) == r
    text = path.read_text()
    data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    assert data["version"] == 1 and data["name"] == name


def test_resolve_recipe_forms():
    r = Recipe.preset("w8")
    assert resolve_recipe("w8") == r
    assert resolve_recipe(r) is r
    assert resolve_recipe(r.to_dict()) == r


# -- a hand-written YAML recipe -----------------------------------------------------------------
HAND_WRITTEN = r"""
version: 1
name: hand-written
default:
  weight: {format: int8, granularity: per_channel}
  activation: {format: uint8, symmetric: false, observer: percentile, observer_args: {p: 0.001}}
embedding:
  weight: int8                     # shorthand: just a format name
overrides:
  encoder.layer.0.attention.self.query:                  # exact module path
    weight: {format: int4, granularity: per_group, group_size: 32}
  're:.*\.(key|value)$':                                   # regex
    weight: {format: fp8_e4m3, granularity: per_channel}
    activation: null
  encoder.layer.*.output.dense: null                       # glob, kept float
  'type:Linear':                                           # by module type
    weight: {format: uint4, granularity: per_group, symmetric: false, group_size: 128, observer: mse}
  'type:Conv2d': {weight: nf4}
  classifier: null                                         # exact path, kept float
keep_float: [pooler.dense, 're:.*\.lm_head$']
keep_first: true
keep_last: false
smoothing: {alpha: 0.5, fold_only: true}
calibration: {max_samples: 64, progress: false}
"""


def test_hand_written_yaml_loads(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(HAND_WRITTEN)
    r = Recipe.load(path)
    assert r.name == "hand-written"
    assert r.default == LayerConfig(QuantSpec("int8", "per_channel"),
                                    QuantSpec("uint8", symmetric=False, observer="percentile",
                                              observer_args={"p": 0.001}))
    assert r.default.activation != QuantSpec("uint8", symmetric=False, observer="percentile")  # args compared
    assert r.embedding == LayerConfig(QuantSpec("int8"))
    ov = r.overrides
    assert list(ov) == ["encoder.layer.0.attention.self.query", r"re:.*\.(key|value)$",
                        "encoder.layer.*.output.dense", "type:Linear", "type:Conv2d", "classifier"]
    assert ov["encoder.layer.0.attention.self.query"].weight == QuantSpec("int4", "per_group", group_size=32)
    assert ov["encoder.layer.0.attention.self.query"].activation is None
    assert ov[r"re:.*\.(key|value)$"] == LayerConfig(QuantSpec("fp8_e4m3", "per_channel"), None)
    assert ov["encoder.layer.*.output.dense"] is None and ov["classifier"] is None
    assert ov["type:Linear"].weight == QuantSpec("uint4", "per_group", symmetric=False, group_size=128,
                                                 observer="mse")
    assert ov["type:Conv2d"].weight == QuantSpec("nf4")
    assert r.keep_float == ("pooler.dense", r"re:.*\.lm_head$")
    assert r.keep_first is True and r.keep_last is False
    assert r.smoothing == SmoothingConfig(alpha=0.5, fold_only=True)
    assert r.calibration == CalibrationConfig(max_samples=64, progress=False)
    # and it survives a save / load in both formats, observer_args included
    for suffix in (".yaml", ".json"):
        out = tmp_path / f"again{suffix}"
        r.save(out)
        again = Recipe.load(out)
        assert again == r and again.to_dict() == r.to_dict()
        assert again.default.activation.observer_args == {"p": 0.001}
    assert resolve_recipe(str(path)) == r


def test_with_overrides_validates():
    r = Recipe.preset("w8").with_overrides({"re:.*fc$": None, "head": LayerConfig(QuantSpec("int4", "per_channel"))})
    assert r.overrides["re:.*fc$"] is None and r.overrides["head"].weight.format == "int4"
    _expect(lambda: Recipe.preset("w8").with_overrides({"re:.*": LayerConfig(QuantSpec("int9"))}),
            "overrides['re:.*'].weight.format", "int9", "did you mean")


# -- validation errors ---------------------------------------------------------------------------
def _expect(fn, field, *fragments):
    with pytest.raises(RecipeError) as e:
        fn()
    msg = str(e.value)
    assert e.value.field == field, msg
    assert f"'{field}'" in msg, msg                # the message names the field
    for f in fragments:
        assert f in msg, msg
    return msg


def _bad(data, field, *fragments):
    return _expect(lambda: Recipe.from_dict(data), field, *fragments)


W8 = {"format": "int8", "granularity": "per_channel"}


def test_unknown_top_level_key_suggests():
    _bad({"defualt": {"weight": W8}}, "defualt", "did you mean 'default'")
    _bad({"default": {"weight": W8}, "keep_frist": True}, "keep_frist", "did you mean 'keep_first'")


def test_unknown_nested_keys_suggest():
    _bad({"default": {"wieght": W8}}, "default.wieght", "did you mean 'weight'")
    _bad({"default": {"weight": {"format": "int8", "granularty": "per_channel"}}},
         "default.weight.granularty", "did you mean 'granularity'")
    _bad({"default": {"weight": W8}, "calibration": {"progres": False}}, "calibration.progres",
         "did you mean 'progress'")
    _bad({"default": {"weight": W8}, "smoothing": {"alpah": 0.5}}, "smoothing.alpah", "did you mean 'alpha'")


def test_unknown_format_in_override():
    _bad({"default": {"weight": W8}, "overrides": {"re:.*": {"weight": {"format": "int9"}}}},
         "overrides['re:.*'].weight.format", "int9", "did you mean")
    _bad({"default": {"weight": W8}, "overrides": {"fc": {"weight": "fp8_e4m4"}}},
         "overrides['fc'].weight.format", "did you mean 'fp8_e4m3'")


def test_missing_format():
    _bad({"default": {"weight": {"granularity": "per_channel"}}}, "default.weight.format", "missing")


def test_bad_granularity():
    _bad({"default": {"weight": {"format": "int8", "granularity": "per_chanel"}}},
         "default.weight.granularity", "did you mean 'per_channel'")
    _bad({"default": {"weight": {"format": "int8", "granularity": "rowwise"}}},
         "default.weight.granularity", "per_tensor")


def test_bad_observer():
    _bad({"default": {"weight": W8, "activation": {"format": "uint8", "symmetric": False, "observer": "mse2"}}},
         "default.activation.observer", "did you mean 'mse'")


def test_per_group_without_group_size():
    _bad({"default": {"weight": {"format": "int4", "granularity": "per_group"}}}, "default.weight.group_size")
    _bad({"default": {"weight": {"format": "int4", "granularity": "per_group", "group_size": 0}}},
         "default.weight.group_size")
    _bad({"default": {"weight": {"format": "int4", "granularity": "per_group", "group_size": "64"}}},
         "default.weight.group_size")


def test_group_size_with_per_channel():
    _bad({"default": {"weight": {"format": "int8", "granularity": "per_channel", "group_size": 64}}},
         "default.weight.group_size", "per_channel")


@pytest.mark.parametrize("fmt", [n for n, f in FORMATS.items() if not f.supports_asymmetric])
def test_asymmetric_symmetric_only_format(fmt):
    _bad({"default": {"weight": {"format": fmt, "symmetric": False}}}, "default.weight.symmetric", fmt)


def test_per_token_without_dynamic():
    _bad({"default": {"weight": W8, "activation": {"format": "int8", "granularity": "per_token"}}},
         "default.activation.dynamic", "dynamic")


def test_weight_cannot_be_dynamic():
    _bad({"default": {"weight": {"format": "int8", "dynamic": True}}}, "default.weight")
    _bad({"default": {"weight": {"format": "int8", "granularity": "per_token", "dynamic": True}}},
         "default.weight")
    _bad({"default": {"weight": {"format": "int8", "granularity": "per_token_group", "group_size": 32,
                                 "dynamic": True}}}, "default.weight")


def test_per_token_group_needs_group_size_and_dynamic():
    act = {"format": "int8", "granularity": "per_token_group"}
    _bad({"default": {"weight": W8, "activation": {**act, "dynamic": True}}},
         "default.activation.group_size", "per_token_group")
    _bad({"default": {"weight": W8, "activation": {**act, "group_size": 32}}}, "default.activation.dynamic", "dynamic")
    r = Recipe.from_dict({"default": {"weight": W8, "activation": {**act, "group_size": 32, "dynamic": True}}})
    assert r.default.activation.group == 32 and r.default.activation.per_token


def test_embedding_with_activation():
    _bad({"default": {"weight": W8}, "embedding": {"weight": "int8", "activation": "int8"}},
         "embedding.activation", "weight-only")


@pytest.mark.parametrize("gran,extra", [("per_channel", {}), ("per_group", {"group_size": 32})])
def test_activation_per_channel_or_group(gran, extra):
    _bad({"default": {"weight": W8, "activation": {"format": "int8", "granularity": gran, **extra}}},
         "default.activation.granularity", "per_tensor")


@pytest.mark.parametrize("alpha", [1.5, -0.1, "0.5", True])
def test_smoothing_alpha_out_of_range(alpha):
    _bad({"default": {"weight": W8}, "smoothing": {"alpha": alpha}}, "smoothing.alpha", "[0, 1]")


def test_smoothing_alphas_out_of_range():
    _bad({"default": {"weight": W8}, "smoothing": {"alphas": [0.5, 2.0]}}, "smoothing.alphas[1]", "[0, 1]")


@pytest.mark.parametrize("version", [0, 2, "1"])
def test_unsupported_version(version):
    _bad({"version": version, "default": {"weight": W8}}, "version", "not supported")


@pytest.mark.parametrize("field,value", [("keep_first", "yes"), ("keep_last", 1), ("name", 3)])
def test_wrong_scalar_types(field, value):
    _bad({"default": {"weight": W8}, field: value}, field, "expected")


def test_wrong_structure_types():
    _bad({"default": {"weight": W8}, "keep_float": "classifier"}, "keep_float", "list")
    _bad({"default": {"weight": W8}, "keep_float": ["a", 3]}, "keep_float")
    _bad({"default": "int8"}, "default", "mapping")
    _bad({"default": {"weight": 8}}, "default.weight", "mapping")
    _bad({"default": {"weight": {"format": "int8", "symmetric": "yes"}}}, "default.weight.symmetric", "bool")
    _bad({"default": {"weight": W8}, "overrides": ["fc"]}, "overrides", "mapping")
    _bad({"default": {"weight": W8}, "overrides": {"fc": "int8"}}, "overrides['fc']", "mapping")
    _bad({"default": {"weight": W8}, "smoothing": 0.5}, "smoothing", "mapping")
    _bad({"default": {"weight": W8}, "calibration": {"max_samples": 0}}, "calibration.max_samples")
    _bad(["w8"], "<root>", "mapping")


def test_calibration_max_samples_wrong_type():
    try:
        _bad({"default": {"weight": W8}, "calibration": {"max_samples": "10"}}, "calibration.max_samples")
    except TypeError as e:
        raise AssertionError(f"TypeError instead of RecipeError: {e}") from e


@pytest.mark.parametrize("section,key", [("smoothing", "fold_only"), ("calibration", "progress")])
def test_small_config_bool_wrong_type(section, key):
    _bad({"default": {"weight": W8}, section: {key: "no"}}, f"{section}.{key}")


def test_group_size_bool_rejected():
    _bad({"default": {"weight": {"format": "int4", "granularity": "per_group", "group_size": True}}},
         "default.weight.group_size")


def test_unknown_preset_suggests_closest():
    _expect(lambda: Recipe.preset("w8a9"), "name", "w8a9", "did you mean 'w8a8'")
    _expect(lambda: resolve_recipe("w4-g65"), "recipe", "did you mean 'w4-g64'")
    msg = _expect(lambda: resolve_recipe("something-else-entirely"), "recipe", "valid values")
    for name in PRESET_NAMES:
        assert repr(name) in msg


def test_missing_recipe_file(tmp_path):
    missing = tmp_path / "nope" / "recipe.yaml"
    _expect(lambda: resolve_recipe(str(missing)), "recipe", str(missing), "does not exist")
    _expect(lambda: resolve_recipe(tmp_path / "recipe.json"), "recipe", "does not exist")


def test_recipe_file_wrong_suffix_or_content(tmp_path):
    txt = tmp_path / "recipe.txt"
    txt.write_text("{}")
    _expect(lambda: Recipe.load(txt), "path", ".yaml")
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    _expect(lambda: Recipe.load(lst), "<root>", "mapping")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    _expect(lambda: Recipe.load(empty), "<root>", "mapping")
    typo = tmp_path / "typo.yaml"
    typo.write_text("defualt:\n  weight: int8\n")
    _expect(lambda: resolve_recipe(str(typo)), "defualt", "did you mean 'default'")


@pytest.mark.parametrize("suffix,text", [(".yaml", "default: {weight: [\n"), (".json", "{bad json")])
def test_malformed_recipe_file(tmp_path, suffix, text):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    try:
        Recipe.load(path)
    except RecipeError:
        return
    except Exception as e:
        raise AssertionError(f"{type(e).__name__} instead of RecipeError") from e
    raise AssertionError("no error")


# -- property: any valid recipe round-trips ------------------------------------------------------
@st.composite
def _weight_specs(draw):
    fmt = draw(st.sampled_from(list(FORMATS)))
    sym = True if not FORMATS[fmt].supports_asymmetric else draw(st.booleans())
    gran = draw(st.sampled_from(["per_tensor", "per_channel", "per_group"]))
    gs = draw(st.sampled_from([16, 32, 64, 128])) if gran == "per_group" else None
    obs = draw(st.sampled_from(["minmax", "mse"]))
    return QuantSpec(fmt, gran, sym, gs, observer=obs)


@st.composite
def _act_specs(draw):
    fmt = draw(st.sampled_from(["int8", "uint8", "fp8_e4m3", "fp8_e5m2"]))
    sym = True if not FORMATS[fmt].supports_asymmetric else draw(st.booleans())
    gran = draw(st.sampled_from(["per_tensor", "per_token"]))
    dynamic = True if gran == "per_token" else draw(st.booleans())
    obs = draw(st.sampled_from(OBSERVERS))
    args = draw(st.sampled_from([{}, {"p": 1e-3}, {"momentum": 0.05}]))
    return QuantSpec(fmt, gran, sym, None, dynamic, obs, args)


_layer = st.builds(LayerConfig, st.one_of(st.none(), _weight_specs()), st.one_of(st.none(), _act_specs()))
_patterns = st.sampled_from(["fc", "encoder.layer.*.output.dense", r"re:.*\.(query|key)$", "type:Linear",
                             "type:Conv2d", "head"])
_unit = st.floats(0, 1, allow_nan=False)

_recipes = st.builds(
    Recipe,
    name=st.text("abcdefgh-_0123456789", min_size=1, max_size=12),
    default=st.one_of(st.none(), _layer),
    embedding=st.one_of(st.none(), st.builds(LayerConfig, _weight_specs(), st.none())),
    overrides=st.dictionaries(_patterns, st.one_of(st.none(), _layer), max_size=4),
    keep_float=st.lists(_patterns, max_size=2, unique=True).map(tuple),
    keep_first=st.booleans(),
    keep_last=st.booleans(),
    smoothing=st.one_of(st.none(), st.builds(
        SmoothingConfig, alpha=st.one_of(st.none(), _unit), alphas=st.lists(_unit, min_size=1, max_size=4).map(tuple),
        outlier_quantiles=st.lists(_unit, max_size=4).map(tuple), fold_only=st.booleans())),
    calibration=st.builds(CalibrationConfig, st.one_of(st.none(), st.integers(1, 10_000)), st.booleans()),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_recipes)
def test_any_valid_recipe_round_trips(r):
    r.validate()
    d = r.to_dict()
    assert Recipe.from_dict(d) == r
    assert Recipe.from_dict(json.loads(json.dumps(d))).to_dict() == d       # observer_args included
    assert Recipe.from_dict(yaml.safe_load(yaml.safe_dump(d, sort_keys=False))).to_dict() == d
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".yaml", ".json"):
            path = Path(tmp) / f"r{suffix}"
            r.save(path)
            again = Recipe.load(path)
            assert again == r and again.to_dict() == d
