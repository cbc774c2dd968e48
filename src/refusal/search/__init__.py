"""The search for the least-damaging edit: trials, study storage, the second direction, confirmation and choice."""
