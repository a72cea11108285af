"""Makes this folder the data package ``fedsynth.templates.flower_aggregator`` of the wheel (see setup.py).

The aggregator host does not need this file; ``fedsynth templates flower-aggregator -o DIR`` leaves it out.
"""
