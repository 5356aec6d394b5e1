"""Canonical ONNX → target ONNX: precision and lowering passes."""
