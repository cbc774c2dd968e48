"""The run directory: artifacts and fingerprints, the lock, the workspace a command opens, runs given to other commands."""
