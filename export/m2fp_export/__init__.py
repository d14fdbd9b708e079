"""ModelScope M2FP -> ONNX exporter. The only home of torch and modelscope in this project."""

__version__ = "0.1.0"
