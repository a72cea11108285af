"""Our compression pipeline for OpenFL: lossless float32 bytes, without numpy's removed
``reshape(newshape=)`` that OpenFL 1.9's own pipeline calls (breaks with numpy >= 2.4)."""

from __future__ import annotations

from typing import Any

import numpy as np
from openfl.pipelines.pipeline import Float32NumpyArrayToBytes, TransformationPipeline


class _Float32ToBytes(Float32NumpyArrayToBytes):
    """Same wire format as OpenFL's ``Float32NumpyArrayToBytes`` (shape in ``int_list``)."""

    def backward(self, data: bytes, metadata: dict[str, Any], **kwargs: Any) -> np.ndarray:
        shape = tuple(int(s) for s in metadata["int_list"])
        return np.frombuffer(data, dtype=np.float32).reshape(shape).copy()  # writable, like torch wants


class Float32Pipeline(TransformationPipeline):
    """Lossless pipeline selected by ``compression_pipeline.template`` in plan.yaml."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(transformers=[_Float32ToBytes()], **kwargs)
