"""Integer weight quantization (``k2mini quantize``, ``convert --dtype int4|int8``)."""

# Here rather than in formats.py, so `k2mini quantize --help` can list them without
# importing torch and compressed-tensors.
FORMATS = ("compressed-tensors", "bnb", "quanto")
