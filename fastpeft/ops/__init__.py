"""Functional ops: each is a ``torch.library`` custom op (with a fake implementation for
torch.compile) wrapped in an autograd Function. The backend is chosen once, by
``fastpeft._backend.select_backend``, and passed to the op as a string.
"""
