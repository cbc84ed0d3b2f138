"""Tuneforge's side of vLLM: the engine arguments derived from the platform's limits (``config``) and
the index of servable adapters in object storage that the gateway maintains (``index``). The LoRA
resolver plugin that reads the index inside vLLM's process imports vllm, so it lives outside this
package: ``deploy/vllm/tuneforge_lora_resolver.py``."""
