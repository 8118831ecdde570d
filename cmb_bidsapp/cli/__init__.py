"""Command-line entry points: parser (argv to config) and the four console scripts."""
