"""The picture stages: decode, preprocess, postprocess, render, compose (numpy and OpenCV)."""

import os

THREADS = max(1, min(2, os.cpu_count() or 1))  # the threads one request's per-pixel work and encoding use
