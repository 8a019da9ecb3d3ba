"""captioner: CNN encoder + recurrent decoder image captioning.

    from captioner import Captioner
    Captioner.load().caption("photo.jpg")[0].caption

Importing this package is cheap and never imports Lightning: inference needs only torch,
torchvision, Pillow and a model file.
"""
from __future__ import annotations

from captioner.version import __version__
__all__ = ["Captioner", "DecodingConfig", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import captioner` (and the CLI's start-up) does not pay for torch until needed.
    if name == "Captioner":
        from captioner.api import Captioner
        return Captioner
    if name == "DecodingConfig":
        from captioner.decoding import DecodingConfig
        return DecodingConfig
    raise AttributeError(name)
