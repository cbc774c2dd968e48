"""The command line generated from the settings tree: one option per setting, with its help and parser.

``add_arguments`` adds a group's options to a subcommand (defaults stay None so ``from_args`` can
tell what was given); ``from_args`` applies the given options to defaults or to a run's saved tree.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import MISSING, fields
from typing import Any

from ..settings import Settings, group_types


class _Null:
    """An option given as 'none': the setting's None, told apart from an option not given (argparse's None)."""

    def __repr__(self) -> str:
        return "none"


NULL = _Null()


def optional(parse: Any) -> Any:
    """``parse`` for a setting that may be None: 'none' gives ``NULL`` (None once applied), anything else ``parse``."""

    def parse_optional(text: str) -> Any:
        return NULL if text.strip().lower() == "none" else parse(text)

    parse_optional.__name__ = getattr(parse, "__name__", "value")  # argparse names the parser in its error messages
    return parse_optional


def flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, groups: tuple[str, ...]) -> None:
    """One option per setting of ``groups`` (a group, or one setting of it: "evaluation.max_new_tokens"); defaults stay
    None so ``from_args`` can tell what was given."""
    hints = {name: typing.get_type_hints(group_type) for name, group_type in group_types().items()}
    titled: dict[str, argparse._ArgumentGroup] = {}
    for entry in groups:
        group_name, _, only = entry.partition(".")
        group = titled.get(group_name) or titled.setdefault(group_name, parser.add_argument_group(f"{group_name} settings"))
        for f in fields(group_types()[group_name]):
            if only and f.name != only:
                continue
            meta, default = f.metadata, (f.default if f.default is not MISSING else f.default_factory())  # type: ignore[misc,operator]
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            help_text = f"{meta['help']} (default: {shown})"
            if hints[group_name][f.name] is bool:
                action = argparse.BooleanOptionalAction if default else "store_true"  # an on-by-default switch: --no-NAME turns it off
                group.add_argument(flag(f), dest=f"{group_name}.{f.name}", action=action, default=None, help=help_text)
                continue
            parse = meta["parse"] or _scalar_parser(hints[group_name][f.name])
            if type(None) in typing.get_args(hints[group_name][f.name]) and not meta["choices"]:
                parse = optional(parse)
            group.add_argument(
                flag(f),
                dest=f"{group_name}.{f.name}",
                type=parse,
                default=None,
                choices=meta["choices"],
                metavar=meta["metavar"] or (None if meta["choices"] else f.name.upper()),
                help=help_text,
            )


def _scalar_parser(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return {int: int, float: float, str: str}.get(base, str)


def from_args(args: argparse.Namespace, base: Settings | None = None) -> Settings:
    """``base`` (defaults, or a run's saved tree) with every option given on the command line applied."""
    settings = Settings.from_dict(base.to_dict()) if base is not None else Settings()
    for key, value in vars(args).items():
        if "." in key and value is not None:
            group_name, name = key.split(".", 1)
            setattr(getattr(settings, group_name), name, None if value is NULL else value)
    return settings


def given(args: argparse.Namespace, group: str) -> dict:
    """The options of ``group`` that were given on the command line."""
    return {k.split(".", 1)[1]: None if v is NULL else v for k, v in vars(args).items() if k.startswith(group + ".") and v is not None}


def join_negative_lists(argv: list[str]) -> list[str]:
    """argparse reads '--positions -1,-2' as two options; pass it on as '--positions=-1,-2'."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in ("--positions", "--layers", "--source-positions") and arg[:1] == "-" and arg[1:2].isdigit():
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out
