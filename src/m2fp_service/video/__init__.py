"""Video and live: the light segmenter on every frame, M2FP's parts and people on key frames."""
