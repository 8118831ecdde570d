"""The simulator: anatomy, susceptibility, GRE physics, acquisition and the BIDS writer."""
