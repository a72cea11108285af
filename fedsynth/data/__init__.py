"""Data: CSV manifests, image reading/preprocessing, datasets and loaders."""

from fedsynth.data.dataset import ImageDataset, collate, load_datasets, make_loader
from fedsynth.data.images import read_image, save_image
from fedsynth.data.manifest import Record, construct_csv, read_manifest, split_by_subject, write_manifest

__all__ = ["ImageDataset", "Record", "collate", "construct_csv", "load_datasets", "make_loader", "read_image",
           "read_manifest", "save_image", "split_by_subject", "write_manifest"]
