"""What an artifact's declaration sees of a run: its ``Known`` inputs, and for a maker the model and the run's files.

These are protocols because the declarations sit below the ``Context`` (run.workspace) that satisfies them:
a ``Reading`` (a run read without its model, e.g. ``run.given``) is enough to compute an artifact's inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from ..data.prompt_sets import Prompts
from ..model.chat import ChatModel
from ..settings import Settings

NO_GIVEN: Mapping[str, Any] = MappingProxyType({})  # an artifact's ``given`` when the caller knows nothing the run does not


class Known(Protocol):
    """What an artifact's inputs are computed from: the settings, the prompt lists, the model's content hash."""

    @property
    def settings(self) -> Settings: ...

    @property
    def prompts(self) -> Prompts: ...

    @property
    def model_id(self) -> str: ...


class RunFiles(Protocol):
    """The run directory as a maker or a loader uses it (a ``RunDir``)."""

    @property
    def path(self) -> Path: ...

    def file(self, name: str, index: int = 0) -> Path: ...

    def read(self, name: str) -> dict: ...


class Workspace(Known, Protocol):
    """What a maker needs besides: the loaded model and the run directory."""

    @property
    def chat(self) -> ChatModel: ...

    @property
    def run(self) -> RunFiles: ...


@dataclass
class Reading:
    """The ``Known`` inputs of a run read without loading its model."""

    settings: Settings
    prompts: Prompts
    model_id: str = ""
