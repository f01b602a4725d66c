"""Writing a checkpoint in the formats other runtimes read: GGUF (llama.cpp) and ONNX (onnxruntime)."""
