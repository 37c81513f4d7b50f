"""Running an export: the onnxruntime decoder with KV cache and the runner behind generate and chat."""
