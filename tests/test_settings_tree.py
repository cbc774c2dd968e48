"""One settings tree: a default a user or a benchmark can set is defined once, in ``refusal.settings``.

A dataclass elsewhere that carries such a value takes its default with ``settings.tree_field``; a field that
only shares a name and a default with a tree setting but means something else is listed with the reason.
"""

import argparse
import dataclasses
import importlib
import json
import pkgutil
import re
import types
from dataclasses import MISSING, fields

import pytest

import refusal
from conftest import error_line
from refusal.cli.main import build_parser, main
from refusal.cli.options import flag, from_args
from refusal.errors import RefusalError
from refusal.measure.evaluation import EvalSettings
from refusal.measure.judges import REFUSAL_PHRASES
from refusal.settings import GROUPS, EvaluationSettings, SearchSettings, Settings, group_types, tree_field

# Fields that share a name and a default with a tree setting but are not that setting.
NOT_THE_TREE = {
    "Sampling.seed": "the seed of sampled decoding, not the data split's",
    "OrganismConfig.batch_size": "the organism's training batch, not the evaluation's",
    "OrganismConfig.steps": "the organism's training steps, not the attack's",
}
# The settings this issue moved into the tree, by the command whose help must show them.
NEW_SETTINGS = {
    "evaluation.early_stop": "run",
    "evaluation.ce_max_length": "run",
    "evaluation.samples_per_kind": "evaluate",
    "search.refine_scales": "search",
    "search.second_fractions": "search",
    "search.second_screen_strength": "search",
    "search.second_strengths": "search",
    "search.second_base_kl_fraction": "search",
    "safety.safety_judge": "evaluate",
    "safety.safety_format": "evaluate",
    "hooks.coeff": "generate",
}


def _default(f: dataclasses.Field) -> object:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING  # type: ignore[misc]


def _tree() -> dict[str, list[tuple[str, object]]]:
    """setting name -> [(group.name, default)] over the whole tree."""
    out: dict[str, list[tuple[str, object]]] = {}
    for group, group_type in group_types().items():
        for f in fields(group_type):
            out.setdefault(f.name, []).append((f"{group}.{f.name}", _default(f)))
    return out


def _dataclasses() -> list[type]:
    """Every dataclass defined in a module of the package, the tree's own groups left out."""
    found, tree = [], {*group_types().values(), Settings}
    for info in pkgutil.walk_packages(refusal.__path__, "refusal."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__ and obj not in tree:
                found.append(obj)
    return found


def _command(name: str) -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    return commands[name]


# ---- (a) no dataclass repeats a tree default -------------------------------------------------------
def test_no_dataclass_default_repeats_a_tree_setting():
    tree, repeats, seen = _tree(), [], set()
    classes = _dataclasses()
    assert any(c.__name__ == "EvalSettings" for c in classes)  # the walk reaches the measure layer
    for cls in classes:
        for f in fields(cls):
            name, default = f"{cls.__name__}.{f.name}", _default(f)
            if "tree" in f.metadata or default is MISSING:
                continue
            same = [path for path, value in tree.get(f.name, []) if value == default and type(value) is type(default)]
            if same and name in NOT_THE_TREE:
                seen.add(name)
            elif same:
                repeats.append(f"{name} = {default!r} repeats settings {', '.join(same)}; take it with tree_field({same[0]!r})")
    assert not repeats, repeats
    assert seen == set(NOT_THE_TREE), f"stale NOT_THE_TREE entries: {sorted(set(NOT_THE_TREE) - seen)}"


def test_a_class_taking_tree_settings_takes_every_one_it_names():
    """Where a class takes some settings from the tree, a field named like another tree setting is taken too:
    its default cannot drift from the tree's (EvalSettings' batch size once did)."""
    tree, drifted = _tree(), []
    for cls in _dataclasses():
        declared = [f for f in fields(cls) if "tree" in f.metadata]
        for f in declared:
            group, _, name = f.metadata["tree"].partition(".")
            assert _default(f) == _default(next(g for g in fields(group_types()[group]) if g.name == name)), f"{cls.__name__}.{f.name}"
        if declared:
            taken = [f for f in fields(cls) if f.name in tree and "tree" not in f.metadata and _default(f) is not MISSING]
            drifted += [f"{cls.__name__}.{f.name}" for f in taken]
    assert not drifted, f"fields named like tree settings but not taken from the tree: {drifted}"


def test_tree_field_names_an_existing_setting():
    assert tree_field("evaluation.batch_size").default == EvaluationSettings().batch_size
    assert tree_field("search.refine_scales").default_factory() == SearchSettings().refine_scales
    with pytest.raises(RefusalError, match="evaluation.batch"):
        tree_field("evaluation.batch")


# ---- (b) EvalSettings is the tree's evaluation group ----------------------------------------------
def test_eval_settings_by_default_are_the_tree_s_defaults():
    tree, built = EvaluationSettings(), EvalSettings()
    for f in fields(EvalSettings):
        if "tree" in f.metadata:
            assert getattr(built, f.name) == getattr(tree, f.metadata["tree"].partition(".")[2]), f.name
    assert built.batch_size == tree.batch_size == 32  # the drift fixed: EvalSettings said 16
    assert EvalSettings.from_settings(tree, []) == built and built.phrases == REFUSAL_PHRASES


def test_eval_settings_from_the_tree_carry_every_evaluation_setting_they_name():
    e = EvaluationSettings(max_new_tokens=5, batch_size=3, early_stop=False, ce_tokens=0, ce_max_length=64, samples_per_kind=1)
    built = EvalSettings.from_settings(e, [7, 8], ["I cannot"])
    assert (built.max_new_tokens, built.batch_size, built.early_stop, built.ce_tokens) == (5, 3, False, 0)
    assert (built.ce_max_length, built.samples_per_kind, built.refusal_ids, built.phrases) == (64, 1, [7, 8], ("I cannot",))


# ---- (c) `refusal generate` takes its defaults from the tree ---------------------------------------
def test_generate_defaults_are_the_tree_s():
    args = _command("generate").parse_args(["hello"])
    settings = from_args(args)
    assert settings.evaluation.max_new_tokens == EvaluationSettings().max_new_tokens == 32
    assert settings.hooks == Settings().hooks and settings.hooks.coeff == 1.0
    assert not hasattr(args, "max_new_tokens") and not hasattr(args, "coeff")  # no second definition in the parser
    given = from_args(_command("generate").parse_args(["hello", "--max-new-tokens", "7", "--coeff", "-2"]))
    assert given.evaluation.max_new_tokens == 7 and given.hooks.coeff == -2.0


def test_generate_runs_with_the_tree_s_token_count(monkeypatch, capsys):
    import refusal.commands.generate as generate

    asked = []

    class Engine:
        def generate(self, prompts, max_new_tokens):
            asked.append(max_new_tokens)
            return ["ok" for _ in prompts]

        def close(self):
            pass

    chat = types.SimpleNamespace(max_positions=None, check_context=lambda prompts, n: None, path="x")
    monkeypatch.setattr(generate, "load", lambda settings: chat)
    monkeypatch.setattr(generate, "make_engine", lambda chat, settings, path: Engine())
    assert main(["generate", "--json", "hello"]) == 0
    assert json.loads(capsys.readouterr().out)["completions"] == [{"prompt": "hello", "completion": "ok"}]
    assert asked == [EvaluationSettings().max_new_tokens]


def test_a_nan_coefficient_is_named_before_any_model_loads(capsys):
    assert "--coeff must be a finite number" in error_line(capsys, ["generate", "--coeff", "nan", "--quiet", "Hi"])


def test_evaluate_takes_the_safety_judge_from_the_tree():
    argv = ["--edited", "x", "--out", "y"]
    assert from_args(_command("evaluate").parse_args(argv)).safety == Settings().safety
    settings = from_args(_command("evaluate").parse_args([*argv, "--safety-judge", "guard", "--safety-format", "harmbench"]))
    assert (settings.safety.safety_judge, settings.safety.safety_format) == ("guard", "harmbench")


# ---- (d) the new settings have flags, help and checks ---------------------------------------------
@pytest.mark.parametrize("path", sorted(NEW_SETTINGS))
def test_new_settings_have_a_flag_and_help_in_their_command(path):
    group, _, name = path.partition(".")
    f = next(f for f in fields(group_types()[group]) if f.name == name)
    assert f.metadata["help"] and group in GROUPS
    assert flag(f) in _command(NEW_SETTINGS[path]).format_help()


def test_new_settings_parse_and_reach_the_tree():
    args = _command("search").parse_args(
        ["--refine-scales", "1.5,2", "--second-fractions", "0.5", "--second-strengths", "0.4,0.6", "--second-screen-strength", "0.2"]
    )
    search = from_args(args).search
    assert (search.refine_scales, search.second_fractions) == ([1.5, 2.0], [0.5])
    assert (search.second_strengths, search.second_screen_strength) == ([0.4, 0.6], 0.2)
    evaluation = from_args(_command("run").parse_args(["--no-early-stop", "--ce-max-length", "128", "--samples-per-kind", "0"])).evaluation
    assert (evaluation.early_stop, evaluation.ce_max_length, evaluation.samples_per_kind) == (False, 128, 0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: setattr(s.search, "refine_scales", []), "--refine-scales"),
        (lambda s: setattr(s.search, "second_strengths", [0.5, -1.0]), "--second-strengths"),
        (lambda s: setattr(s.search, "second_fractions", [1.5]), "--second-fractions"),
        (lambda s: setattr(s.search, "second_screen_strength", 0.0), "--second-screen-strength"),
        (lambda s: setattr(s.search, "second_base_kl_fraction", 0.0), "--second-base-kl-fraction"),
        (lambda s: setattr(s.evaluation, "ce_max_length", 1), "--ce-max-length"),
        (lambda s: setattr(s.evaluation, "samples_per_kind", -1), "--samples-per-kind"),
        (lambda s: setattr(s.hooks, "coeff", float("inf")), "--coeff"),
    ],
)
def test_bad_new_values_are_named(change, message):
    settings = Settings()
    change(settings)
    with pytest.raises(RefusalError, match=message):
        settings.validate()


def test_a_run_json_without_the_new_settings_reads_with_their_defaults():
    data = Settings().to_dict()
    for group, name in (("evaluation", "early_stop"), ("search", "refine_scales")):
        del data[group][name]
    del data["safety"], data["hooks"]
    assert Settings.from_dict(data) == Settings()


def test_help_states_the_setting_not_a_timing():
    timing = re.compile(r"\d+(\.\d+)?x (faster|slower)|\bfaster\b|\bslower\b|CPU cores")
    found = [f"{g}.{f.name}" for g, t in group_types().items() for f in fields(t) if timing.search(f.metadata["help"])]
    assert not found, found
