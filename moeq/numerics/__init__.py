"""The numerics contract, in plain torch: recipes and their alignments, FP8 rowwise and
MXFP8 quantization (the references every kernel is checked against), token-group
helpers and argument validation. Imports torch only."""
