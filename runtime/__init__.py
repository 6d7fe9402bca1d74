"""llamabox runtime: loads GGUF with llama.cpp and generates. The only package that imports llama_cpp."""
