"""Architecture tables of the three models Ideogram 4 runs, one module each, shared by converter and runtime.

``dit``: the two CFG backbones (config, tensor inventory, detection). ``text_encoder``: Qwen3-VL's language model
as the caption encoder (taps, chat template, tensor names). ``vae``: the FLUX.2 decoder (config, inventory, eps).
``latent``: the latent token layout and the official de-normalisation constants. Nothing here reads files or
builds graphs.
"""

#: The files of a converted model folder (what `convert` writes and `run` reads), named after the components'
#: folders in the Hugging Face layout.
MODEL_FILES = {
    "transformer": "transformer.gguf",
    "unconditional_transformer": "unconditional_transformer.gguf",
    "text_encoder": "text_encoder.gguf",
    "vae": "vae.gguf",
}
