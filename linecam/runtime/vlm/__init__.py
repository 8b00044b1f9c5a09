"""Compact VLM runtime (ONNX Runtime + numpy + tokenizers; no torch): region-grounded defect descriptions."""
