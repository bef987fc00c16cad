"""Model backends behind one contract: :class:`~geobatch.models.base.Segmenter`."""

from geobatch.models.base import MODELS, Instance, Prompt, Segmenter, TileInput, TileResult, load_model

__all__ = ["MODELS", "Instance", "Prompt", "Segmenter", "TileInput", "TileResult", "load_model"]
