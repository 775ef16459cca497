"""Property tests of the recipe loader: any dict, JSON or YAML either becomes a valid
:class:`Recipe` (which then round-trips through its dict form) or raises :class:`RecipeError`
naming a field; never another exception. Inputs are valid preset dicts with random leaves
replaced, keys added or removed, and free-form JSON/YAML values and text.
"""
import json
import math
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from qcompile import Recipe, RecipeError
from qcompile.presets import PRESETS

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# leaves a user (or a YAML parser) can put anywhere
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 20, 10 ** 20),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                     st.sampled_from(["int8", "per_group", "minmax", "gptq", "float16", "w8a8", "re:(", "type:Linear",
                                      "default", "reference", "1", "true", "null", "per_token", "nf4"]))
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                     max_leaves=12)
_keys = st.sampled_from(["version", "name", "default", "embedding", "overrides", "keep_float", "keep_first",
                         "keep_last", "smoothing", "weight_algorithm", "tied_head", "calibration", "backend", "qat",
                         "weight", "activation", "format", "granularity", "symmetric", "group_size", "dynamic",
                         "observer", "observer_args", "scale_dtype", "alpha", "alphas", "method", "damping",
                         "max_samples", "learn_scale", "observer_steps", "fc", "re:.*"])


_value = st.one_of(_scalars, _json)   # half scalars: a container-heavy mix never reaches the type checks


@st.composite
def _edited(draw, valid, depth=0):
    """``valid`` (a preset's dict) with each field kept (mostly), replaced by anything, or dropped, recursing
    into nested dicts, plus maybe an unknown key: most fields stay valid so later checks are reached."""
    if not isinstance(valid, dict) or depth > 3:
        return draw(st.one_of(st.just(valid), _value)) if draw(st.integers(0, 3)) == 0 else valid
    out = {}
    for k, v in valid.items():
        action = draw(st.sampled_from(["keep", "keep", "keep", "edit", "replace", "drop"]))
        if action == "keep":
            out[k] = v
        elif action == "edit":
            out[k] = draw(_edited(v, depth + 1))
        elif action == "replace":
            out[k] = draw(_value)
    if draw(st.integers(0, 5)) == 0:
        out[draw(st.one_of(_keys, st.text(max_size=6)))] = draw(_value)
    return out


def _full_preset(name):
    """A preset's dict with every optional section filled in, so each can be edited."""
    d = Recipe.preset(name).to_dict()
    d["smoothing"] = d["smoothing"] or {"alpha": 0.5, "alphas": [0.5], "outlier_quantiles": [0.5], "fold_only": False}
    d["weight_algorithm"] = d["weight_algorithm"] or {"method": "gptq", "damping": 0.01, "act_order": True,
                                                      "block_size": 128, "grid": 20, "clip_grid": 20,
                                                      "max_shrink": 0.5, "sample_rows": 2048}
    d["qat"] = d["qat"] or {"learn_scale": False, "observer_steps": None, "fold_bn": True}
    d["overrides"] = d["overrides"] or {"fc": {"weight": {"format": "int4", "granularity": "per_group",
                                                          "group_size": 32, "observer_args": {"p": 0.01}},
                                               "activation": None}}
    d["keep_float"] = d["keep_float"] or ["head"]
    return d


def _schema_dicts():
    return st.sampled_from(sorted(PRESETS)).map(_full_preset).flatmap(_edited)


def _paths(obj, prefix=()):
    """Every (path, value) in a nested dict/list, the root included."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _set(obj, path, value):
    if not path:
        return value
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = value
    return obj


@st.composite
def _mutated_recipe_dicts(draw):
    """A preset's dict with 1-4 random edits: a leaf or subtree replaced, a key removed or added."""
    preset = draw(st.sampled_from(sorted(PRESETS)))
    data = Recipe.preset(preset).to_dict()
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p, _ in _paths(data)]
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        node = data
        for p in path:
            node = node[p]
        if action == "replace":
            data = _set(data, path, draw(_json))
        elif action == "delete" and path:
            parent = data
            for p in path[:-1]:
                parent = parent[p]
            del parent[path[-1]]
        elif action == "add" and isinstance(node, dict):
            node[draw(st.one_of(_keys, st.text(max_size=6)))] = draw(_json)
        if not isinstance(data, (dict, list)):
            break
    return data


def _check(data):
    """The loader's contract on one input."""
    try:
        r = Recipe.from_dict(data)
    except RecipeError as e:
        assert isinstance(e.field, str) and e.field, f"RecipeError without a field: {e}"
        assert f"'{e.field}'" in str(e)
        return None
    assert isinstance(r, Recipe)
    r.validate()
    d = r.to_dict()
    assert Recipe.from_dict(d) == r, "an accepted recipe does not round-trip through its dict"
    return r


@SETTINGS
@given(_mutated_recipe_dicts())
def test_mutated_preset_dicts_load_or_name_the_field(data):
    note(repr(data))
    r = _check(data)
    if r is not None:   # accepted: it also survives JSON and YAML
        text = json.dumps(r.to_dict())
        assert Recipe.from_dict(json.loads(text)) == r
        assert Recipe.from_dict(yaml.safe_load(yaml.safe_dump(r.to_dict()))) == r


@SETTINGS
@given(_schema_dicts())
def test_recipe_shaped_dicts_load_or_name_the_field(data):
    note(repr(data))
    _check(data)


@SETTINGS
@given(st.one_of(_json, st.dictionaries(_keys, _json, max_size=6)))
def test_arbitrary_values_load_or_name_the_field(data):
    note(repr(data))
    _check(data)


@settings(max_examples=120, deadline=None, derandomize=True, database=None)
@given(st.one_of(st.text(max_size=80),
                 st.lists(st.sampled_from(["default:", "  weight: int8", "  weight: {format: int9}", "overrides:",
                                           "  fc: null", "keep_float: fc", "version: 2", "- a", "name: [1",
                                           "smoothing: {alpha: 2}", "  activation: !!binary AAAA", "qat: 5",
                                           "calibration: {max_samples: 1e3}", "tied_head: both", "\t", ": :",
                                           "default: {weight: {format: int4, granularity: per_group}}",
                                           "date: 2024-01-01", "keep_first: yes", "backend: onnx"]),
                          max_size=6).map("\n".join)))
def test_arbitrary_yaml_files_load_or_name_the_field(text):
    note(repr(text))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(text)
        try:
            r = Recipe.load(path)
        except RecipeError as e:
            assert e.field and f"'{e.field}'" in str(e)
            return
        assert Recipe.from_dict(r.to_dict()) == r


def test_non_finite_numbers_name_the_field():
    """NaN/Inf where a number is expected is the field's error (found by the suite)."""
    base = Recipe.preset("w8a8").to_dict()
    for path, value in [(("smoothing", "alpha"), math.nan), (("weight_algorithm",), {"damping": math.inf}),
                        (("calibration", "max_samples"), math.inf)]:
        data = json.loads(json.dumps(base))
        _set(data, path, value)
        try:
            Recipe.from_dict(data)
        except RecipeError as e:
            assert e.field.startswith(path[0])
        else:
            raise AssertionError(f"{path}={value} accepted")


_NASTY = [None, True, 0, -1, 5, 1.5, math.nan, math.inf, "x", "", [], [1], ["a"], {}, {"a": 1}, [[]], {"": None}]


def test_every_field_replaced_by_each_nasty_value():
    """Exhaustive complement of the random suites: each field of each preset (optional sections
    filled in), at every depth, replaced by each of a few hostile values."""
    import copy

    for preset in sorted(PRESETS):
        base = _full_preset(preset)
        for path, _ in _paths(base):
            for value in _NASTY:
                data = _set(copy.deepcopy(base), path, copy.deepcopy(value))
                try:
                    _check(data)
                except AssertionError:
                    raise
                except Exception as e:  # noqa: BLE001 - the contract: only RecipeError
                    raise AssertionError(f"preset {preset}, {'.'.join(map(str, path))} = {value!r}: "
                                         f"{type(e).__name__}: {e}") from e
