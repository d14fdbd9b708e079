"""m2fp-service: multi-person human parsing on ONNX Runtime."""

__version__ = "0.1.0"
