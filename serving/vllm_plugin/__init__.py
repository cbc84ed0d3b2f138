"""Tuneforge's side of vLLM: the engine arguments derived from the platform's limits (``config``), the
index of servable adapters in object storage that the gateway maintains (``index``), and a LoRA
resolver plugin that runs inside vLLM's process and loads ``ft:`` names from that index (``resolver``).

The gateway imports ``config`` and ``index`` only (neither imports vllm); ``resolver`` imports vllm and
is loaded by vLLM through its ``vllm.general_plugins`` entry point, never by the gateway.
"""
