"""mixtral-trt: compile Mixtral checkpoints into ONNX and TensorRT engines."""

__version__ = "0.1.0"
