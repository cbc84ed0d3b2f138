"""Tuneforge's training kernels: fused Triton ops for LoRA/QLoRA fine-tuning, each with its plain-torch spec.

Importing this package imports torch only. Triton is imported by an op module the first time that op
is used, and only if it is installed; without CUDA (or without Triton) every public op runs its
``*_reference()`` implementation, which is also the specification the tests compare against.

The package is named ``tuneforge_kernels`` (it lives in the repository's ``kernels/`` folder, which
has no ``__init__.py``): transformers (5.25 and later) depends on Hugging Face's kernel hub, whose
import name is ``kernels``, and imports it whenever that distribution is installed. A package of ours
called ``kernels`` shadowed it from the repository root and broke every transformers import there.
tests/kernels/test_package_identity.py holds both facts.

Use an op through its module (``from tuneforge_kernels.rms_norm import rms_norm``): each module is
named for its op, so the package re-exports nothing (a lazy re-export would be shadowed by the submodule
itself).
"""
