"""Makes this folder the data package ``fedsynth.templates.flower_site`` of the wheel (see setup.py).

A site does not need this file; ``fedsynth templates flower-site -o DIR`` leaves it out.
"""
