"""cmb-bidsapp: detection of cerebral microbleeds on SWI, T2*-GRE, multi-echo GRE and QSM."""

try:  # written by hatch-vcs at build/install time
    from ._version import __version__
except ImportError:  # a plain source tree with no install and no git metadata
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
