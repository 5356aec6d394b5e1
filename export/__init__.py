"""Checkpoint → canonical ONNX (opset 24 + mixtral.MoETop2)."""
