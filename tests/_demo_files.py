"""What the shipped demo model's files say about themselves: the default image size and size range its backbones
store, and its encoder's vocabulary. Read from the files, so that the tests that draw with the demo or edit its
files follow whichever demo ships (64×64 with a 448-token vocabulary until issue 13's 128×128 model replaces it)."""

from __future__ import annotations

import gguf

from gguf_dit.runtime.backbone_file import BackboneFile
from gguf_dit.runtime.demo import DEMO_DIR

_COND = BackboneFile(DEMO_DIR / "transformer.gguf")
SIZE: int = _COND.default_size
LOW, HIGH = _COND.size_range
VOCAB: int = len(gguf.GGUFReader(str(DEMO_DIR / "text_encoder.gguf")).fields["tokenizer.ggml.tokens"].data)
