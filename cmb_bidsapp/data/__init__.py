"""Package data: default model bundle, MARS region map and other shipped files."""
