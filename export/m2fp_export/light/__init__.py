"""The light model: MediaPipe's selfie segmentation (Apache-2.0) from the mediapipe wheel, to ONNX.

fetch.py           pip download --no-deps mediapipe==0.10.21, extract and verify the .tflite
tflite_to_onnx.py  our TFLite -> ONNX converter (incl. MediaPipe's Convolution2DTransposeBias)
reference.py       MediaPipe's own runtime (mediapipe 1.2.x Tasks), the parity reference
export.py          convert -> parity check -> model card -> atomic write
cli.py             ``m2fp export-light``
"""
