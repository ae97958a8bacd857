"""Outside implementations as bench peers: llama.cpp (llama_cpp.py), transformers (transformers.py)."""
