"""Prompts: the built-in and user prompt sets and their splits, the held-out set, prompts with a suffix as token ids."""
