"""Templates and notes for a hospital site (``flower/start-supernode.sh``, ``flower/data.yaml``).

The wheel ships this folder as ``fedsynth.collaborator``; ``fedsynth templates flower-site -o DIR`` copies it out.
"""
