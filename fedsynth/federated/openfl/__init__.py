"""OpenFL 1.9 adapter: a task runner over the core :class:`~fedsynth.federated.site.Site`, a
per-group aggregation function over :mod:`fedsynth.federated.aggregation`, workspace templates
(``plans/``), a 127.0.0.1-bound aggregator start-up, export to core checkpoints, and the
one-machine trial behind ``fedsynth federate openfl``.

Imports of OpenFL happen inside the submodules that need it, so ``import fedsynth`` stays light.
"""
