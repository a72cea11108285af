"""Templates and notes for the aggregator host (``flower/start-superlink.sh``).

The wheel ships this folder as ``fedsynth.aggregator``; ``fedsynth templates flower-aggregator -o DIR`` copies it out.
"""
