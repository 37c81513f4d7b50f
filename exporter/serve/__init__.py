"""`persona-export serve`: an OpenAI-compatible chat-completions server (FastAPI on uvicorn) over the exports
of a run, decoded on onnxruntime by one scheduler that batches the requests of a model."""
