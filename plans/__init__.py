"""The OpenFL workspace template (``workspace/``), one for every family: a family's workspace is
written from it (``fedsynth templates openfl-<family>``, ``fedsynth federate openfl``), see
:mod:`fedsynth.federated.openfl.workspace`.

The wheel ships this folder as ``fedsynth.plans``; see :mod:`fedsynth.resources`.
"""
