"""compressor: distill, quantize, binarize and prune a PyTorch model into a measured, gated edge artifact.

Heavy dependencies (torch, onnxruntime, transformers) are imported where they are used, so that
`import compressor` and `compress --help` stay fast.
"""

__version__ = "0.1.0"
