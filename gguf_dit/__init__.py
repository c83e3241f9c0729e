"""gguf-dit: GGUF converter and ggml runtime for Ideogram 4.0."""

__version__ = "0.1.0"
