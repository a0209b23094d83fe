"""Taking models out of lmforge (and bringing them in): Hugging Face, later GGUF and ONNX."""
