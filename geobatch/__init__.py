"""geobatch: distributed geospatial batch processing of prompts over satellite and aerial scenes."""

__version__ = "0.1.0"
