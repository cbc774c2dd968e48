"""Batched greedy generation (left padding, KV cache, stop at EOS) under whatever hooks are active."""

from __future__ import annotations

import torch

from .activations import batches
from .model import ChatModel
from .progress import track


def generate(chat: ChatModel, instructions: list[str], max_new_tokens: int = 32, batch_size: int = 16, description: str = "generating") -> list[str]:
    """Greedy completions of chat-formatted instructions, decoded without special tokens."""
    tokenizer = chat.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    completions: list[str] = []
    for group in track(batches(instructions, batch_size), description):
        batch = chat.batch(group)
        prompt_len = batch["input_ids"].shape[1]
        with torch.inference_mode():
            out = chat.model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        completions.extend(tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True))
    return completions
