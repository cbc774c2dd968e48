"""Each command as a library function: run, evaluate, generate, search, attack, analyze."""
