"""m3d-edge: compiled, edge-deployable runtime for the M3D-LaMed 3D medical multimodal LLMs."""

__version__ = "0.1.0"
