"""Running an export: the onnxruntime decoder with KV cache and the chat runner."""
