"""Fused Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1).

Import lazily: ``triton.jit`` reads TRITON_INTERPRET when a kernel module is imported.
"""
