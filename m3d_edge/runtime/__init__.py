"""Torch-free inference runtime: imaging I/O, backends, generation loop, pipeline."""
