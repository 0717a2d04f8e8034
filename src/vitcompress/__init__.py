"""vitcompress: make Vision Transformers small and fast for edge CPUs and FPGAs."""

__version__ = "0.1.0"

from vitcompress.errors import VitcompressError

__all__ = ["VitcompressError", "__version__"]
