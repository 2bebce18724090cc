"""`python -m draftadapt.server MODEL --draft DIR [-- vllm serve args]`: vLLM's OpenAI server, ready for pushes.

See `engine/serve.py` (the command, the route guard) and `engine/remote.py` (the client side).
"""
from .engine.serve import main

if __name__ == "__main__":
    main()
