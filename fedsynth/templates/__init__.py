"""Operator templates, shipped as package data: ``flower_site`` (``start-supernode.sh``, ``data.yaml``)
and ``flower_aggregator`` (``start-superlink.sh``).

In the repository they live in ``collaborator/flower/`` and ``aggregator/flower/`` (see setup.py);
``fedsynth templates flower-site|flower-aggregator -o DIR`` copies them out (:mod:`fedsynth.federated.templates`).
"""
