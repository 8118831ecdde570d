"""Preprocessing: brain extraction, bias correction, echo combination, intensity normalisation."""
