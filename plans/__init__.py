"""OpenFL workspace templates, one folder per family (``gan``, ``autoencoder``, ``diffusion``).

The wheel ships this folder as ``fedsynth.plans``; see :mod:`fedsynth.resources`.
"""
