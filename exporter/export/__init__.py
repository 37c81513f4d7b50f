"""Physical pruning and the export formats' writers: Hugging Face safetensors (also shard by shard), ONNX, weight-only
quantized ONNX, GGUF, onnxruntime-genai folders."""
