"""Outside implementations as bench peers: llama.cpp (llama_cpp.py), vLLM's CPU engine (vllm_engine.py, its own venv),
transformers (transformers.py)."""
