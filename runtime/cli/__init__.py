"""The command line: every command's `main` and the console conventions they share."""
