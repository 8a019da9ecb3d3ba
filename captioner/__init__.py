"""captioner: CNN encoder + recurrent decoder image captioning.

Importing this package is cheap and never imports Lightning: inference needs only torch,
torchvision, Pillow and a model file.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Captioner", "__version__"]


def __getattr__(name: str):
    # Lazy so `import captioner` (and the CLI's start-up) does not pay for torch until needed.
    if name == "Captioner":
        from captioner.api import Captioner
        return Captioner
    raise AttributeError(name)
