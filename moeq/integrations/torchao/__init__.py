"""torchao's own training linears for the dense layers (``convert_model(..., linears=...)``).

The one place moeq imports torchao's float8 / MX linear converters; the grouped-GEMM
``"torchao"`` kernel lives with the other kernels in ``moeq.ops.torchao_kernel``.
"""
