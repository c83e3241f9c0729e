"""The embedded demo model's world: its procedural data set (``data``) and its prompt-following score (``score``).

The model files themselves ship in ``gguf_dit/runtime/demo_model`` (located by ``gguf_dit.runtime.demo``).
"""
