"""Data: CSV manifests, image reading/preprocessing, datasets and loaders.

Names load on first use (:mod:`fedsynth.lazy`): the CSV tools in ``fedsynth.data.manifest`` need no torch.
"""

from fedsynth.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    **dict.fromkeys(["ImageDataset", "collate", "load_datasets", "make_loader"], "fedsynth.data.dataset"),
    **dict.fromkeys(["read_image", "save_image"], "fedsynth.data.images"),
    **dict.fromkeys(["Record", "construct_csv", "read_manifest", "split_by_subject", "write_manifest"],
                    "fedsynth.data.manifest"),
})
