"""Tuneforge's training kernels: fused Triton ops for LoRA/QLoRA fine-tuning, each with its plain-torch spec.

Importing this package imports torch only. Triton is imported by an op module the first time that op
is used, and only if it is installed; without CUDA (or without Triton) every public op runs its
``*_reference()`` implementation, which is also the specification the tests compare against.

This package is *not* Hugging Face's kernel-hub package that is also importable as ``kernels``:
transformers probes for that one (``transformers.utils.import_utils.is_kernels_available``) by the
version of a distribution named ``kernels`` or, failing that, this module's ``__version__``. We ship no
such distribution, define no ``__version__``, and expose none of its API (``get_kernel``,
``LayerRepository``...), so the probe reports "unavailable" and transformers never routes into us.
tests/kernels/test_package_identity.py holds that invariant.

Use an op through its module (``from kernels.rms_norm import rms_norm``): each module is named for its
op, so the package re-exports nothing (a lazy re-export would be shadowed by the submodule itself).
"""
