"""Hardening: a LoRA trained so that refusal survives the package's own attacks (refusal-feature adversarial training),
merged into tensor deltas and compared with the original."""
