"""Triton kernels of moeq, installed as ``moeq.kernels``.

Every kernel module here has a plain-torch reference beside it (``*_reference`` functions)
that the tests compare against bitwise where the math allows.
"""
