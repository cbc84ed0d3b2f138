"""The built-in inference engine: an OpenAI-compatible HTTP server for base models and LoRA adapters.

It plays the part vLLM plays in production, with the same HTTP surface (``/v1/models``,
``/v1/chat/completions``, ``/v1/completions``, ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``,
``/health``), so the serving gateway cannot tell the two apart. Run it with
``python -m gpu_worker.engine --model tuneforge-tiny``.

Layout, outside in: ``server`` (routes, thin) → ``completions`` (OpenAI requests to token prompts and
back) → ``models`` (which base model or adapter a name means) → ``generation`` (a background loop per
base model doing continuous, heterogeneous-adapter batching) with ``kvcache``, ``sampling`` and
``detokenizer`` as its parts; ``adapters`` validates and materialises adapter folders.
"""
