"""Differential privacy: example-level DP-SGD (Opacus) per site, and the ledger that accounts it."""

from fedsynth.privacy.ledger import PrivacyLedger
from fedsynth.privacy.plugin import OpacusPrivacy, PairedDPOptimizer, make_privacy_plugin, private_groups

__all__ = ["OpacusPrivacy", "PairedDPOptimizer", "PrivacyLedger", "make_privacy_plugin", "private_groups"]
