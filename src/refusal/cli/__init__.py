"""The command line: options generated from the settings tree, one library call per command, console output."""
