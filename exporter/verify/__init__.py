"""Proofs that an export computes what the masked model computes (float64, by layer, ONNX)."""
