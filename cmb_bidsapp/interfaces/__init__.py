"""Thin Nipype interfaces over the plain functions of preproc/, detect/, anatomy/ and models/."""
