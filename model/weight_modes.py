"""The CPU weight formats a model can be served in (`--weights`); no torch here, so command-line
parsers can name them without importing it. What each format is: model/packed_linear.py."""

# Formats a dense checkpoint can be packed into.
WEIGHT_MODES = ("fp32", "bf16", "int8", "int4")
# Serve a GGUF file's own 4-bit codes (only when loading a .gguf file, or the default model's GGUF).
GGUF_MODE = "gguf"
WEIGHT_CHOICES = WEIGHT_MODES + (GGUF_MODE,)
# What serving on a CPU loads without --weights (the measurements are in docs/configuration.md).
DEFAULT_CPU_WEIGHTS = "bf16"
