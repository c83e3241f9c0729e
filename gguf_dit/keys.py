"""Every GGUF metadata key gguf-dit writes or reads, spelled once (as gguf-py's ``constants.py`` does).

llama.cpp's own keys (``general.*``, ``<arch>.block_count``, ``tokenizer.ggml.*``) are spelled by gguf-py:
use ``gguf.Keys`` for those. What is here is ours: the backbone's ``ideogram4.*`` config keys, the VAE's
``flux2_vae.*`` keys, and the ``gguf_dit.*`` provenance and hint keys.
"""

from __future__ import annotations

from gguf import Keys

from .arch.dit import ARCH as DIT_ARCH
from .arch.vae import ARCH as VAE_ARCH

ARCHITECTURE = Keys.General.ARCHITECTURE
ALIGNMENT = Keys.General.ALIGNMENT


def dit(field: str) -> str:
    """A backbone config key: ``ideogram4.<Ideogram4Config field>`` (and ``role``, ``head_dim``)."""
    return f"{DIT_ARCH}.{field}"


def vae(field: str) -> str:
    """A VAE key: ``flux2_vae.<VAEConfig field>``, ``latent_shift``/``latent_scale``, ``checkpoint_bn_*``."""
    return f"{VAE_ARCH}.{field}"


# -- backbone (ideogram4.*)
ROLE = dit("role")
HEAD_DIM = dit("head_dim")
#: Present in every self-describing backbone; its absence marks a metadata-less (stable-diffusion.cpp) file.
EMB_DIM = dit("emb_dim")

# -- provenance and hints every gguf-dit file may carry
CONVERTER_VERSION = "gguf_dit.converter_version"
SIZE_RANGE = "gguf_dit.size_range"
DEFAULT_SIZE = "gguf_dit.default_size"
RECIPE_NAME = "gguf_dit.recipe.name"
RECIPE_JSON = "gguf_dit.recipe.json"
RECIPE_TENSORS = "gguf_dit.recipe.tensors"
Q4K_PATH = "gguf_dit.quantization.q4_k_path"
#: sha256 of the importance-matrix file a backbone was quantized with (absent: no imatrix).
IMATRIX_SHA256 = "gguf_dit.quantization.imatrix.sha256"

# -- llama-quantize's own imatrix provenance keys (tools/quantize; gguf-py does not spell them), written alike
IMATRIX_FILE = "quantize.imatrix.file"
IMATRIX_DATASET = "quantize.imatrix.dataset"
IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"
SOURCE_CONFIG = "gguf_dit.source.config"
SOURCE_DTYPES = "gguf_dit.source.dtypes"
SOURCE_FILES = "gguf_dit.source.files"
SOURCE_LAYOUT = "gguf_dit.source.layout"
SOURCE_SHA256 = "gguf_dit.source.sha256"
#: Activation smoothing folded into the weights (``convert --smooth``): method, alpha, calibration file and its hash.
SMOOTH_METHOD = "gguf_dit.smoothing.method"
SMOOTH_ALPHA = "gguf_dit.smoothing.alpha"
SMOOTH_CALIBRATION = "gguf_dit.smoothing.calibration"
SMOOTH_CALIBRATION_SHA256 = "gguf_dit.smoothing.calibration_sha256"

# -- text encoder (llama.cpp qwen3 file plus ours)
TE_TAPS = "gguf_dit.text_encoder.taps"
TE_TEMPLATE = "gguf_dit.text_encoder.template"
TE_LINEAR_TYPE = "gguf_dit.text_encoder.linear_type"
TE_DOWN_PROJ_TYPE = "gguf_dit.text_encoder.down_proj_type"
TE_SOURCE_LAYOUT = "gguf_dit.text_encoder.source.layout"
TE_SOURCE_DTYPES = "gguf_dit.text_encoder.source.dtypes"
TE_SOURCE_FILES = "gguf_dit.text_encoder.source.files"
TE_SOURCE_MROPE = "gguf_dit.text_encoder.source.mrope_section"

# -- VAE
VAE_DTYPE = "gguf_dit.vae.dtype"
VAE_NORM_EPS = vae("norm_eps")
VAE_SCALE_FACTOR = vae("scale_factor")
VAE_LATENT_SHIFT = vae("latent_shift")
VAE_LATENT_SCALE = vae("latent_scale")
VAE_LATENT_NORM_SOURCE = vae("latent_norm_source")  # informational: where latent_shift/latent_scale came from
VAE_BN_MEAN = vae("checkpoint_bn_mean")
VAE_BN_VAR = vae("checkpoint_bn_var")
