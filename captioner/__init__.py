"""captioner: "Show, Attend and Tell" image captioning with swappable visual attention."""

__version__ = "0.1.0"
