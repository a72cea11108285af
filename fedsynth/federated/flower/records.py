"""Group-keyed weights and metrics <-> Flower records (the only Flower-specific encoding; the
messages built from them are :mod:`fedsynth.federated.flower.messages`).

Keys stay ``"<group>/<name>"`` end to end, so the server can tell which groups it received.
Float arrays travel in the federation's transport dtype (``to_transport``); integer buffers
travel unchanged and are restored to the receiver's own dtypes (``from_transport``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord

from fedsynth.errors import WeightsError
from fedsynth.federated.aggregation import group_of, to_transport


def encode(weights: Mapping[str, np.ndarray], dtype: str, exact_groups: Iterable[str] = ()) -> ArrayRecord:
    """Cast to the transport dtype (``exact_groups`` stay as they are) and pack."""
    return weights_to_record(to_transport(weights, dtype, exact_groups))


def weights_to_record(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Pack ``{"group/name": array}`` into an :class:`ArrayRecord` (bfloat16 is refused: numpy cannot save it)."""
    arrays: dict[str, Array] = {}
    for key, value in weights.items():
        arr = np.asarray(value)
        arr = arr if arr.flags.c_contiguous else arr.copy(order="C")
        if arr.dtype.kind not in "fiub":
            raise WeightsError(f"cannot send '{key}' with dtype {arr.dtype}: use float32/float16 or integer arrays")
        arrays[key] = Array(arr)
    return ArrayRecord(arrays)


def record_to_weights(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack an :class:`ArrayRecord` into ``{"group/name": ndarray}``."""
    return {key: array.numpy() for key, array in record.items()}


def record_groups(record: ArrayRecord) -> list[str]:
    """The parameter groups present in a record."""
    return sorted({group_of(k) for k in record.keys()})


def record_nbytes(record: ArrayRecord) -> int:
    """Payload bytes of a record (serialized array data, what goes on the wire)."""
    return int(sum(len(array.data) for array in record.values()))


def metrics_record(metrics: Mapping[str, float | int], **extra: float | int) -> MetricRecord:
    """A :class:`MetricRecord` of plain finite floats/ints (Flower refuses numpy scalars)."""
    out: dict[str, int | float | list[int] | list[float]] = {}
    for key, value in {**metrics, **extra}.items():
        if isinstance(value, (bool, np.bool_)):
            out[key] = int(value)
        elif isinstance(value, (int, np.integer)):
            out[key] = int(value)
        else:
            v = float(value)
            if math.isfinite(v):
                out[key] = v
    return MetricRecord(out)
