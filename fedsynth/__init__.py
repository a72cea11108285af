"""fedsynth: federated training of generative models of medical images."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedsynth")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
