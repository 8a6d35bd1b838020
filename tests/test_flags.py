"""`keras_ssrl.cli`: flag tables over config dataclasses (help, apply, flag_of)."""

from __future__ import annotations

import argparse

import pytest

from keras_ssrl.cli import Flag, FlagTable, get_path, set_path
from keras_ssrl.config import PretrainConfig
from tests.conftest import load_script

pretrain_cli = load_script("scripts/pretrain.py")

TABLE = FlagTable(
    PretrainConfig,
    [
        Flag("--epochs", "epochs", int, "passes"),
        Flag("--width", "encoder.width", int, "encoder width"),
        Flag(
            "--corruption-rate",
            "{method}.corruption_rate",
            float,
            "corruption rate",
            methods=("scarf", "byol"),
        ),
        Flag("--alpha", "vime.alpha", float, "feature loss weight", methods=("vime",)),
        Flag("--symmetric", "byol.symmetric", bool, "swapped term", methods=("byol",)),
    ],
)


def parse(table: FlagTable, argv: list[str]) -> argparse.Namespace:
    return table.add_to(argparse.ArgumentParser()).parse_args(argv)


def help_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's help text, by its first flag."""
    return {
        action.option_strings[0]: action.help or ""
        for action in parser._actions
        if action.option_strings
    }


def test_help_shows_each_default_once():
    defaults = PretrainConfig()
    texts = help_of(TABLE.add_to(argparse.ArgumentParser()))
    for flag in TABLE.flags:
        assert texts[flag.name].count("(default: ") == 1, texts[flag.name]
    assert texts["--epochs"] == f"passes (default: {defaults.epochs})"
    assert texts["--width"].endswith(f"(default: {defaults.encoder.width})")
    rate = texts["--corruption-rate"]
    assert rate.startswith("scarf/byol: ")
    assert f"scarf {defaults.scarf.corruption_rate}" in rate
    assert f"byol {defaults.byol.corruption_rate}" in rate
    assert texts["--alpha"].startswith("vime: ")


def test_flags_default_to_not_given():
    args = parse(TABLE, [])
    assert all(getattr(args, flag.dest) is None for flag in TABLE.flags)
    assert TABLE.given(args) == []
    config = TABLE.apply(args, PretrainConfig(), method="scarf")
    assert config == PretrainConfig()


def test_apply_sets_nested_and_method_paths():
    args = parse(TABLE, ["--epochs", "3", "--width", "64", "--corruption-rate", "0.1"])
    config = TABLE.apply(args, PretrainConfig(method="byol"), method="byol")
    assert (config.epochs, config.encoder.width) == (3, 64)
    assert config.byol.corruption_rate == 0.1
    assert config.scarf.corruption_rate == PretrainConfig().scarf.corruption_rate
    scarf = TABLE.apply(args, PretrainConfig(), method="scarf")
    assert scarf.scarf.corruption_rate == 0.1
    assert scarf.byol.corruption_rate == PretrainConfig().byol.corruption_rate


def test_boolean_flags_take_both_forms():
    on = TABLE.apply(parse(TABLE, ["--symmetric"]), PretrainConfig(), method="byol")
    off = TABLE.apply(parse(TABLE, ["--no-symmetric"]), PretrainConfig(), "byol")
    assert on.byol.symmetric is True and off.byol.symmetric is False


def test_apply_refuses_a_flag_of_another_method():
    with pytest.raises(ValueError, match="--alpha applies to vime, not scarf"):
        TABLE.apply(parse(TABLE, ["--alpha", "1"]), PretrainConfig(), method="scarf")
    with pytest.raises(ValueError, match="--corruption-rate applies to scarf, byol"):
        TABLE.apply(
            parse(TABLE, ["--corruption-rate", "0.2"]), PretrainConfig(), "vime"
        )


def test_flag_of_names_the_flag():
    assert TABLE.flag_of("epochs") == "--epochs"
    assert TABLE.flag_of("encoder.width") == "--width"
    assert TABLE.flag_of("scarf.corruption_rate") == "--corruption-rate"
    assert TABLE.flag_of("byol.corruption_rate") == "--corruption-rate"
    assert TABLE.flag_of("vime.corruption_rate") is None  # not a method of the flag
    assert TABLE.flag_of("learning_rate") is None
    assert TABLE.flag_of(None) is None


def test_paths():
    config = PretrainConfig()
    set_path(config, "vime.alpha", 0.5)
    assert get_path(config, "vime.alpha") == 0.5 == config.vime.alpha
    with pytest.raises(AttributeError, match="no config field"):
        set_path(config, "vime.depth", 3)


def test_pretrain_script_declares_its_settings_as_a_table():
    parser = pretrain_cli.parser()
    texts = help_of(parser)
    for flag in pretrain_cli.FLAGS.flags:
        assert texts[flag.name].count("(default: ") == 1, flag.name
    assert pretrain_cli.flag_of("scarf.corruption_rate") == "--corruption-rate"
    assert pretrain_cli.flag_of("vime.mask_rate") == "--mask-rate"
    assert pretrain_cli.flag_of("encoder.layers") == "--layers"
    assert pretrain_cli.flag_of("checkpoint_every") == "--checkpoint-every"
    args = parser.parse_args(["--method", "vime", "--corruption-rate", "0.2"])
    with pytest.raises(SystemExit):  # a flag of SCARF and BYOL
        pretrain_cli.resolve_config(args, parser)
