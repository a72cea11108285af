"""Differential privacy: example-level DP-SGD (Opacus) per site, the ledger that accounts a run,
and the site's lifetime ledger across runs (:mod:`fedsynth.privacy.lifetime`).

Names load on first use (:mod:`fedsynth.lazy`): the lifetime ledger's files are read without Opacus.
"""

from fedsynth.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "PrivacyLedger": "fedsynth.privacy.ledger",
    **dict.fromkeys(["OpacusPrivacy", "PairedDPOptimizer", "make_privacy_plugin", "private_groups"], "fedsynth.privacy.plugin"),
    **dict.fromkeys(["Budget", "DatasetLedger", "LifetimeGuard"], "fedsynth.privacy.lifetime"),
})
