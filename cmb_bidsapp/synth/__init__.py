"""The simulator: anatomy, susceptibility, GRE physics, acquisition and the BIDS writer.

Public API::

    simulate_subject(seed, kind, size="full", skull=None, **overrides) -> SimulatedSubject
    write_cohort(out_dir, n_subjects, seed, kinds="mix", size="full", skull_fraction=0.5,
                 preview=False, jobs=1) -> pandas.DataFrame
"""

from .cohort import write_cohort
from .subject import SimulatedSubject, simulate_subject

__all__ = ["SimulatedSubject", "simulate_subject", "write_cohort"]
