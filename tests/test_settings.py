"""The settings tree: one definition per setting, the command line generated from it, saved and read back."""

import argparse
from dataclasses import fields

import pytest

from refusal.cli.options import add_arguments, flag, from_args, given
from refusal.common.parsing import duration, int_list
from refusal.errors import RefusalError
from refusal.settings import GROUPS, SearchSettings, SelectionSettings, Settings


def parser(groups=GROUPS) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p, groups)
    return p


# Flags two settings share: each pair lives in groups no command takes together (search vs attack, attack vs analysis).
SHARED_FLAGS = {"--time-budget": {"search", "attack"}, "--suffix-file": {"attack", "analysis"}}


def test_every_setting_has_help_and_a_unique_flag():
    seen: dict[str, set[str]] = {}
    for group in GROUPS:
        for f in fields(type(getattr(Settings(), group))):
            assert f.metadata["help"], f"{group}.{f.name} has no help text"
            seen.setdefault(flag(f), set()).add(group)
    shared = {name: groups for name, groups in seen.items() if len(groups) > 1}
    assert shared == SHARED_FLAGS


def test_no_command_takes_two_settings_with_one_flag():
    """Where a command takes both settings of a shared flag (`refusal audit`: the search's and the attack's time budget),
    one of them has a flag of its own there."""
    from refusal.cli.main import build_parser

    parser = build_parser()  # argparse refuses a flag defined twice in one command
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        flags_of = {a.dest: set(a.option_strings) for a in sub._actions}
        for flag_name, pair in SHARED_FLAGS.items():
            setting = flag_name.removeprefix("--").replace("-", "_")
            both = [f"{group}.{setting}" for group in sorted(pair) if f"{group}.{setting}" in flags_of]
            assert sum(flag_name in flags_of[d] for d in both) <= 1, f"`refusal {name}` gives {both} the one flag {flag_name}"
    audit = commands["audit"]
    flags = {a.dest: a.option_strings for a in audit._actions}
    assert flags["search.time_budget"] == ["--time-budget"] and flags["attack.time_budget"] == ["--attack-time-budget"]


def test_options_override_defaults_and_nothing_else():
    args = parser(tuple(g for g in GROUPS if g not in ("attack", "analysis"))).parse_args(
        ["--layers", "3-5", "--n-val", "7", "--trust-remote-code", "--time-budget", "90s", "--refusal-tokens", "I,No"]
    )
    settings = from_args(args)
    assert settings.selection.layers == [3, 4, 5] and settings.data.n_val == 7 and settings.model.trust_remote_code
    assert settings.search.time_budget == 90 and settings.evaluation.refusal_tokens == ["I", "No"]
    untouched = Settings()
    assert settings.evaluation.batch_size == untouched.evaluation.batch_size and settings.search.max_kl == untouched.search.max_kl
    assert given(args, "selection") == {"layers": [3, 4, 5]}
    assert settings.search.confirm_train  # a switch that is on by default is turned off with --no-NAME
    off = parser(("search",)).parse_args(["--no-confirm-train"])
    assert from_args(off).search.confirm_train is False and given(off, "search") == {"confirm_train": False}


def test_the_tree_round_trips_through_json_and_rejects_unknown_keys():
    settings = Settings()
    settings.search.variants = ["biprojected"]
    assert Settings.from_dict(settings.to_dict()) == settings
    data = settings.to_dict()
    data["selection"]["kl_treshold"] = 0.3
    with pytest.raises(RefusalError, match="unknown setting.*kl_treshold"):
        Settings.from_dict(data)


def test_the_two_kl_limits_have_different_names():
    assert "kl_threshold" in {f.name for f in fields(SelectionSettings)} and "max_kl" in {f.name for f in fields(SearchSettings)}
    assert not {f.name for f in fields(SelectionSettings)} & {f.name for f in fields(SearchSettings)}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: setattr(s.data, "n_val", 0), "--n-val must be at least 1"),
        (lambda s: setattr(s.evaluation, "ce_tokens", -1), "--ce-tokens must be at least 0"),
        (lambda s: setattr(s.selection, "kl_threshold", float("nan")), "--kl-threshold nan must be a positive number"),
        (lambda s: setattr(s.selection, "prune_layer_fraction", 1.5), "--prune-layer-fraction 1.5"),
        (lambda s: setattr(s.selection, "positions", [0]), "position 0 is out of range"),
        (lambda s: setattr(s.search, "variants", ["sideways"]), "unknown edit variant sideways"),
        (lambda s: setattr(s.search, "max_kl", 0.0), "--max-kl must be a positive KL"),
        (lambda s: setattr(s.search, "refusal_measure", "odds"), "unknown --refusal-measure 'odds'"),
        (lambda s: setattr(s.search, "second_source", "apology"), "unknown --second-source 'apology'"),
        (lambda s: setattr(s.search, "refusal_floor", float("inf")), "--refusal-floor must be a finite score"),
    ],
)
def test_bad_values_are_named(change, message):
    settings = Settings()
    change(settings)
    with pytest.raises(RefusalError, match=message):
        settings.validate()


def test_the_refusal_floor_defaults_to_the_measure_s_own():
    search = SearchSettings()
    assert search.refusal_measure == "margin" and search.refusal_floor is None and search.floor == -2.0
    search.refusal_measure = "log-odds"
    assert search.floor == -5.0
    search.refusal_floor = -2.5
    assert search.floor == -2.5


def test_option_parsers():
    assert int_list("8-10,15") == [8, 9, 10, 15] and int_list("-1,-2") == [-1, -2]
    with pytest.raises(argparse.ArgumentTypeError, match="empty range"):
        int_list("3-1")
    assert duration("20m") == 1200 and duration("none") is None
    with pytest.raises(argparse.ArgumentTypeError, match="must be positive"):
        duration("-5m")
