"""distill: distil long chain-of-thought reasoning into small student models.

Importing this package is cheap and has no side effects: torch, transformers and the GPU
libraries are imported only by the stages that use them.
"""

__version__ = "0.1.0"
