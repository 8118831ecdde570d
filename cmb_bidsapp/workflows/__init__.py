"""Workflow builders: init_*_wf functions returning Nipype workflows."""
