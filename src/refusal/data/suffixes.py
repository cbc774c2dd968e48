"""Prompts with an adversarial suffix, as token ids: [template head][instruction][suffix][template tail].

The attack (``attack``) optimises the suffix's token ids directly, so every consumer (scoring,
generation, the mechanism analysis) builds the same sequence from ids rather than re-tokenizing
text: the instruction's tokens as the chat template renders them, the suffix's tokens appended
after them, then the post-instruction template tokens (``chat.post_instruction_ids``). Each token
belongs to one region — "template", "instruction" or "suffix" — which the analysis of attention uses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import RefusalError
from ..model.chat import ChatModel

REGIONS = ("instruction", "suffix", "template")


@dataclass(frozen=True)
class SuffixedPrompt:
    """One chat prompt split into the regions the attack and the analysis address."""

    head: tuple[int, ...]  # template tokens before the instruction (system prompt, role header)
    instruction: tuple[int, ...]  # the instruction's tokens (plus any template tokens between it and the tail)
    suffix: tuple[int, ...]
    tail: tuple[int, ...]  # the post-instruction template tokens

    @property
    def ids(self) -> list[int]:
        return [*self.head, *self.instruction, *self.suffix, *self.tail]

    @property
    def regions(self) -> list[str]:
        """The region of every token of ``ids``."""
        return ["template"] * len(self.head) + ["instruction"] * len(self.instruction) + ["suffix"] * len(self.suffix) + ["template"] * len(self.tail)

    @property
    def prefix(self) -> list[int]:
        """The tokens before the suffix (what a key/value cache can hold while candidate suffixes vary)."""
        return [*self.head, *self.instruction]

    def with_suffix(self, suffix: list[int] | tuple[int, ...]) -> SuffixedPrompt:
        return replace(self, suffix=tuple(int(t) for t in suffix))


def split_prompt(chat: ChatModel, instruction: str, suffix: list[int] | tuple[int, ...] = ()) -> SuffixedPrompt:
    """``instruction`` rendered by the chat template, split into head / instruction / tail, with ``suffix`` inserted."""
    ids = chat.encode(instruction)
    n_post = chat.n_post
    if ids[-n_post:] != chat.post_instruction_ids:
        raise RefusalError(f"the chat template does not end {instruction[:40]!r} with its usual post-instruction tokens; pass --chat-template FILE")
    n_head = _head_length(chat, instruction, ids)
    return SuffixedPrompt(tuple(ids[:n_head]), tuple(ids[n_head:-n_post]), tuple(int(t) for t in suffix), tuple(ids[-n_post:]))


def _head_length(chat: ChatModel, instruction: str, ids: list[int]) -> int:
    """Tokens that end before the instruction's first character (by offsets; else the common prefix with another prompt)."""
    text = chat.format_chat(instruction)
    begin = text.rfind(instruction)
    try:
        encoded = chat.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if encoded["input_ids"] == ids:
            return sum(1 for _, end in encoded["offset_mapping"] if end <= begin)
    except (NotImplementedError, TypeError, ValueError):
        pass
    other = chat.encode("zq" if instruction != "zq" else "qz")
    n = 0
    while n < min(len(ids), len(other)) and ids[n] == other[n]:
        n += 1
    return n


# ---- suffix tokens --------------------------------------------------------------------------------
def allowed_tokens(chat: ChatModel) -> list[int]:
    """Token ids a suffix may use: not special, decoding to non-empty printable ASCII that is not only spaces."""
    tokenizer = chat.tokenizer
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = min(len(tokenizer), chat.model.get_input_embeddings().weight.shape[0])
    out = []
    for token in range(vocab):
        if token in special:
            continue
        piece = tokenizer.decode([token])
        if piece.strip() and piece.isascii() and piece.isprintable():
            out.append(token)
    if not out:
        raise RefusalError("this tokenizer has no printable ASCII tokens to build a suffix from")
    return out


def random_suffix(chat: ChatModel, length: int, seed: int, allowed: list[int] | None = None) -> list[int]:
    """A suffix of ``length`` tokens drawn uniformly from ``allowed`` (the baseline of the same length)."""
    pool = allowed if allowed is not None else allowed_tokens(chat)
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(length)]


def suffix_from_text(chat: ChatModel, text: str, length: int | None = None, where: str = "the suffix") -> list[int]:
    """The token ids of a suffix given as text (a published suffix); ``length``, if given, must match."""
    if not text.strip():
        raise RefusalError(f"{where} is empty; give the suffix text, or leave the suffix out to optimise one")
    ids = chat.tokenizer(text, add_special_tokens=False)["input_ids"]
    check_roundtrip(chat, text, ids, where)
    if length is not None and len(ids) != length:
        raise RefusalError(
            f"{where} is {len(ids)} tokens long for this tokenizer, not --suffix-length {length}; drop --suffix-length or fix the text"
        )
    return [int(t) for t in ids]


def check_roundtrip(chat: ChatModel, text: str, ids: list[int], where: str) -> None:
    """Refuse text the tokenizer cannot represent: its unknown characters would silently become its unknown token."""
    decoded = chat.tokenizer.decode(ids)
    if "".join(decoded.split()) == "".join(text.split()):
        return
    unk = getattr(chat.tokenizer, "unk_token_id", None)
    pieces: list[str] = []
    try:
        offsets = chat.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        pieces = [text[a:b] for t, (a, b) in zip(ids, offsets) if t == unk]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        pass
    unknown = sorted(set(pieces)) or sorted({c for c in text if not c.isspace() and c not in decoded})
    raise RefusalError(
        f"{where} has text this tokenizer cannot represent ({', '.join(repr(p) for p in unknown) or repr(text[:40])}): it would become "
        f"{decoded[:60]!r}; remove or replace it"
    )


def read_suffix_file(chat: ChatModel, path: str | Path, length: int | None = None) -> tuple[str, list[int]]:
    """(text, token ids) of a suffix file (UTF-8 text; one trailing newline is not part of the suffix)."""
    path = Path(path)
    if not path.is_file():
        raise RefusalError(f"suffix file {path} does not exist or is not a file; give a text file holding the suffix")
    try:
        text = path.read_text(encoding="utf-8").removesuffix("\n")
    except UnicodeDecodeError:
        raise RefusalError(f"suffix file {path} is not UTF-8 text; save the suffix as plain text") from None
    return text, suffix_from_text(chat, text, length, f"suffix file {path}")
