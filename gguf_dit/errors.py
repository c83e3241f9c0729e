"""Typed errors. The CLI turns any GgufDitError into one line and exit code 2."""

from __future__ import annotations


class GgufDitError(Exception):
    """Base class: a user-facing problem with an input, named precisely."""

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None):
        self.path = str(path) if path is not None else None
        self.tensor = tensor
        parts = []
        if self.path:
            parts.append(self.path)
        if tensor:
            parts.append(f"tensor {tensor}")
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class SourceError(GgufDitError):
    """The checkpoint being converted is missing, malformed or not Ideogram 4."""


class RecipeError(GgufDitError):
    """A recipe, rule or type cannot be applied."""


class OptionError(GgufDitError):
    """An option or argument has a value that cannot be used (a size range, a part name, a search path)."""


class OutputError(GgufDitError):
    """An output cannot be written (exists without --force, not writable)."""


class ModelError(GgufDitError):
    """A GGUF file given to the runtime is not a usable Ideogram 4 backbone."""


class InputError(GgufDitError):
    """Runtime inputs (latents, sizes, text features) have the wrong shape."""


class GGMLError(GgufDitError):
    """The ggml libraries are missing, the wrong version, or refused a request."""


class ImatrixError(GgufDitError):
    """An importance-matrix file is missing, truncated or garbled, or does not fit the model it is applied to."""
