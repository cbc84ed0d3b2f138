"""The serving gateway: Tuneforge's OpenAI-compatible inference endpoint.

It authenticates the caller, resolves the requested model (a base model from the catalog or one of the
caller organization's fine-tuned adapters), makes sure the adapter is loaded on an engine replica,
forwards the request to that engine over HTTP (vLLM's OpenAI API), relays the answer and meters it.
It holds no model weights and never imports the ML stack.
"""
