"""Weight edits: the Edit protocol and its kinds, applied in memory under a snapshot that restores bit for bit."""
