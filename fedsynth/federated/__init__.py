"""Federated training: backend-neutral policy (aggregation, site, server) and thin backend adapters."""
