"""The one schema of options (:mod:`dirio.config.schema`): command-line text and configuration-file
values parse to the same value, every option maps into the settings, errors name the key, and the
command line's options are the schema's."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import pytest

from dirio.config import schema
from dirio.config.schema import OPTIONS, REGISTRATION_OPTIONS, OptionError, settings_from_values
from dirio.config.settings import make_settings
from dirio.errors import DirioError


@pytest.mark.parametrize("key, text, native, expected", [
    ("levels", "4,2", [4, 2], (4, 2)),
    ("levels", "4", 4, (4,)),
    ("grid_spacing", "2,1", [2, 1.0], (2.0, 1.0)),
    ("similarity_options", "window=7,kernel=gaussian", {"window": 7, "kernel": "gaussian"},
     {"window": 7, "kernel": "gaussian"}),
    ("combine_options", "diagnose=true", {"diagnose": True}, {"diagnose": True}),
    ("regularizer", "diffusion,bending=0.5", {"diffusion": None, "bending": 0.5}, {"diffusion": None, "bending": 0.5}),
    ("lr", "0.5", 0.5, 0.5),
    ("seed", "3", 3, 3),
    ("diffeomorphic", "true", True, True),
    ("convex_symmetric", "false", False, "false"),
    ("label_ids", "2,3", [2, 3], [2, 3]),
    ("tre_order", "1", 1, 1),
])
def test_text_and_native_values_parse_to_the_same_value(key, text, native, expected):
    option = schema.option(key)
    assert option.convert(text) == option.convert(native) == expected
    assert option.convert(option.convert(text)) == expected  # parsing a parsed value changes nothing


@pytest.mark.parametrize("key, value, words", [
    ("levels", [2.5], "key 'levels' expects integers"),
    ("levels", "2,x", "key 'levels': expected comma-separated integers"),
    ("similarity", "cosine", "key 'similarity': 'cosine' is not one of"),
    ("lr", "fast", "key 'lr': expected a number"),
    ("diffeomorphic", 3, "key 'diffeomorphic' expects true or false"),
    ("regularizer", 5, "key 'regularizer' expects a table of name = weight"),
    ("label_ids", "labels/missing.txt", "key 'label_ids': label ids file labels/missing.txt does not exist"),
])
def test_a_refused_value_names_the_key(key, value, words):
    with pytest.raises(OptionError, match=words.replace("(", r"\(")) as error:
        schema.option(key).convert(value)
    assert error.value.key == key and "--" not in str(error.value)


def test_a_clip_range_with_low_above_high_is_refused_naming_the_key():
    with pytest.raises(DirioError, match="`clip_range`: the clip range needs two numbers"):
        settings_from_values({"normalise": "clip", "clip_range": "90,10"})


def test_an_unknown_key_is_refused():
    with pytest.raises(OptionError, match="key 'window_size': unknown option"):
        settings_from_values({"window_size": 3})


def test_options_map_one_to_one_onto_flat_settings_keys_and_the_combined_ones_as_documented():
    values = {
        "preset": "brain-mri", "similarity": "mse", "levels": "2,1", "iterations": [3, 2], "grid_spacing": "2",
        "smoothing": "1", "features_from": "full", "compose_every": "2", "mask_use": "fill", "lr": 0.7, "schedule": "constant", "regularizer": "diffusion,bending=0.5", "weight": 2,
        "affine": "rigid", "affine_levels": "2", "affine_iterations": "5", "affine_lr": 0.1, "init": "convex",
        "convex_spacing": 4, "convex_radius": 2, "convex_symmetric": "false", "quiet": True,
        "device": "cpu", "itk_field": True, "label_ids": [1], "tre_order": 1,  # run options: no settings
    }
    expected = make_settings(
        "brain-mri", similarity="mse", levels=(2, 1), iterations=(3, 2), grid_spacing=2.0, smoothing=1,
        features_from="full", compose_every=2, mask_use="fill", lr=0.7,
        schedule="constant", regularizers={"diffusion": 2.0, "bending": 0.5}, affine="rigid",
        affine_options={"levels": (2,), "iterations": (5,), "lr": 0.1}, init="convex",
        convex={"grid_spacing": 4, "radius": 2, "symmetric": False}, progress=False,
    )
    assert settings_from_values(values).to_dict() == expected.to_dict()


def test_a_negative_smoothing_is_refused_in_one_line():
    with pytest.raises(DirioError, match="smoothing must be a non-negative integer, got -1"):
        settings_from_values({"smoothing": -1})


def test_compose_every_takes_one_value_or_one_per_level_and_refuses_bad_ones_in_one_line():
    assert settings_from_values({"compose_every": "2,2,4"}, preset="brain-mri").transform.compose_every == (2, 2, 4)
    assert settings_from_values({"compose_every": "0"}, preset="brain-mri").transform.compose_every == 0
    with pytest.raises(DirioError, match="compose_every must be non-negative integers, one value or one per level"):
        settings_from_values({"compose_every": "2,2"}, preset="brain-mri")
    with pytest.raises(DirioError, match="integration_steps must be at least 1"):
        settings_from_values({"compose_every": "2", "symmetric": True, "integration_steps": "0"})
    # a velocity field (or the symmetric pair) asked for does not inherit the preset's composition
    assert settings_from_values({"diffeomorphic": True}, preset="brain-mri").transform.compose_every == 0
    assert settings_from_values({"symmetric": True}, preset="brain-mri").transform.compose_every == 0
    with pytest.raises(OptionError, match="mask_use"):
        settings_from_values({"mask_use": "ignore"})


def test_weight_alone_weights_every_regularizer_of_the_preset():
    settings = settings_from_values({"weight": "0.25"}, preset="lung-ct")
    assert settings.terms.regularizers == {"diffusion": 0.25}


def test_every_registration_option_is_a_command_line_flag_with_its_help():
    from dirio.apps.cli import build_parser

    text = io.StringIO()
    with redirect_stdout(text), pytest.raises(SystemExit):
        build_parser().parse_args(["register", "--help"])
    help_text = " ".join(text.getvalue().split())
    for option in REGISTRATION_OPTIONS:
        assert "--" + option.key.replace("_", "-") in help_text
        if option.help:
            assert " ".join(option.help_text(lambda key: "--" + key.replace("_", "-")).split()) in help_text


def test_the_schema_speaks_of_keys_not_flags():
    for option in OPTIONS:
        assert "--" not in (option.help or ""), option.key


def test_a_presets_combination_rule_applies_to_its_dense_stage_not_to_network_methods():
    """brain-mri projects the regularizer's gradient in its dense stage; a network method run with
    the preset keeps the sum (the papers' IO and NIO losses) unless the rule is given explicitly."""
    from dirio.config.settings import make_settings

    for method in (None, "network+dense"):
        optimization = make_settings("brain-mri", method=method).optimization
        assert (optimization.combine, optimization.combine_options) == ("pcgrad", {"project": "regularizer"})
    for method in ("nio", "network-io"):
        optimization = make_settings("brain-mri", method=method).optimization
        assert (optimization.combine, optimization.combine_options) == ("sum", {})
    explicit = make_settings("brain-mri", method="network-io", combine="pcgrad").optimization
    assert (explicit.combine, explicit.combine_options) == ("pcgrad", {})
    settings = settings_from_values({"method": "nio", "combine": "surgery"}, preset="brain-mri")
    assert settings.optimization.combine == "surgery"
