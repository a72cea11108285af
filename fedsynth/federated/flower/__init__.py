"""Flower backend: ClientApp/ServerApp adapters and the one-machine trial driver."""
