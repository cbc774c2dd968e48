"""Edited checkpoints on disk: the streamed export, per-tensor edits, read-back and the fidelity check."""
