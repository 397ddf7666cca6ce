"""The closed sets of names that the CLI, the manifest and the Python API accept.

One home for each list, import-light (no numpy, onnx or torch) so the CLI builds its option enums from
them without slowing ``--help``; the modules that act on a name validate against the same tuple.
"""

from __future__ import annotations

FAMILIES = ("phi3", "llama")
"""Decoder families of M3D-LaMed (``dims.family`` in the manifest)."""

CHECKPOINT_PRESETS = ("tiny", "bench", "wide", "full")
"""Sizes of the random-weight checkpoints ``tiny-checkpoint`` writes (``m3d_edge.export.tiny.PRESETS``)."""

EXPORT_PRECISIONS = ("fp32", "fp16", "int8", "int4")
"""Decoder precisions the exporter writes straight from the weights (fp16: float16 cache, for GPUs)."""

PRECISIONS = ("fp32", "fp16", "int8", "int4")
"""Graph variant precisions a bundle may hold (export, calibration, TensorRT engines)."""

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
"""Activation range methods of INT8 calibration."""

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
"""ONNX Runtime execution providers by their CLI name."""

NATIVE_TRT = "trt"
"""The provider name that runs ``build-engines``' TensorRT plans without ONNX Runtime."""

PROMPT_FORMATS = ("auto", "demo", "train")
"""How the prompt text is laid out around the image tokens (``m3d_edge.runtime.prompts``)."""
