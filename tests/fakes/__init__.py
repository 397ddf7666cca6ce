"""Stand-ins for GPU packages, so the native TensorRT backend's device logic runs on CPU.

Imported as ``fakes.<module>``: pytest puts ``tests/`` (which has no ``__init__.py``) on ``sys.path``.
"""
