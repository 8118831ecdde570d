"""Detection: radial symmetry transform, candidates, clean-up rules and the lesion table."""
