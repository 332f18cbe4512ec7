"""Expert GEMM blocks: SwiGLU experts in a recipe's numerics (the per-module plan, the
padding policy, the quantized-weight cache). Built on moeq.ops."""
