"""captioner: "Show, Attend and Tell" image captioning with swappable visual attention.

    from captioner import Captioner
    model = Captioner.from_checkpoint("runs/demo/shapes_soft/best.pt")
    print(model.caption("photo.jpg").text)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Captioner", "CaptionResult", "__version__"]

if TYPE_CHECKING:
    from captioner.model import Captioner, CaptionResult


def __getattr__(name: str):
    """Import the model lazily: ``import captioner.config`` stays light."""
    if name in ("Captioner", "CaptionResult"):
        from captioner import model

        return getattr(model, name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
