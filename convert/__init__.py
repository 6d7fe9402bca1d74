"""llamabox convert: Hugging Face Llama checkpoints to GGUF, quantization, and the model store."""
