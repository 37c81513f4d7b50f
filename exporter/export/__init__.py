"""Physical pruning and the export formats: Hugging Face safetensors (also shard by shard) and ONNX."""
