"""The GPU worker: trains adapters (and runs the built-in inference engine) on one accelerator.

Importing this package must stay cheap and torch-free: the control plane imports `gpu_worker.contract`
and `gpu_worker.storage`, the two things every side shares.
"""
