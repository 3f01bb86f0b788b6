"""Plain-PyTorch implementations: the oracle for tests and the fallback backend.

Each ``<family>.py`` holds an autograd-differentiated oracle (``<op>_reference``) and
the explicit forward/backward kernels (``<family>_fwd_reference``, ``<family>_bwd_reference``)
with the same signatures as the fused backends.
"""
