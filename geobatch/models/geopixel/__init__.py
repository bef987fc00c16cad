"""GeoPixel engine: InternLM-XComposer-2.5 language model, CLIP vision tower and SAM2 grounding head."""
