"""The FLUX.2 autoencoder's decoder as Ideogram 4 uses it: config, eps and tensor inventory (diffusers names).

Shared by the converter (which writes ``vae.gguf``) and the runtime (which rebuilds the decoder from it);
``../shared/docs/ideogram4-model.md`` §13-§16.
"""

from __future__ import annotations

import dataclasses

from .latent import PATCH

ARCH = "flux2_vae"  # general.architecture of vae.gguf; its config keys are flux2_vae.<field>
NORM_EPS = 1e-6  # GroupNorm eps of every decoder norm (fixed by the architecture, stored for readers)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """What is needed to rebuild the decoder. ``block_out_channels`` are the *decoder's* channels, listed
    from the highest resolution (``conv_out`` side) to the lowest (``conv_in`` side), as in diffusers."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # the decoder has layers_per_block + 1 ResNets per up block
    latent_channels: int = 32
    out_channels: int = 3
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_post_quant_conv: bool = True
    patch_size: int = PATCH
    batch_norm_eps: float = 1e-4

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def token_dim(self) -> int:
        return self.patch_size * self.patch_size * self.latent_channels

    def problems(self) -> list[str]:
        out = []
        if not self.block_out_channels:
            out.append("block_out_channels is empty")
        for c in self.block_out_channels:
            if c <= 0 or c % self.norm_num_groups:
                out.append(f"channel count {c} is not a positive multiple of norm_num_groups {self.norm_num_groups}")
        if self.layers_per_block < 1:
            out.append(f"layers_per_block {self.layers_per_block} < 1")
        if self.latent_channels <= 0 or self.out_channels <= 0:
            out.append("latent_channels and out_channels must be positive")
        if self.patch_size != PATCH:
            out.append(f"patch_size {self.patch_size} is not {PATCH}")
        return out


def decoder_inventory(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the decoder needs, in diffusers names (as stored in vae.gguf), with its PyTorch shape."""
    inv: dict[str, tuple[int, ...]] = {}
    z = cfg.latent_channels

    def conv(name, cout, cin, k):
        inv[f"{name}.weight"] = (cout, cin, k, k)
        inv[f"{name}.bias"] = (cout,)

    def norm(name, c):
        inv[f"{name}.weight"] = (c,)
        inv[f"{name}.bias"] = (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.conv_shortcut", cout, cin, 1)

    if cfg.use_post_quant_conv:
        conv("post_quant_conv", z, z, 1)
    chans = list(reversed(cfg.block_out_channels))
    top = chans[0]
    conv("decoder.conv_in", top, z, 3)
    resnet("decoder.mid_block.resnets.0", top, top)
    if cfg.mid_block_add_attention:
        a = "decoder.mid_block.attentions.0"
        norm(f"{a}.group_norm", top)
        for p in ("to_q", "to_k", "to_v", "to_out.0"):
            inv[f"{a}.{p}.weight"] = (top, top)
            inv[f"{a}.{p}.bias"] = (top,)
    resnet("decoder.mid_block.resnets.1", top, top)
    prev = top
    for i, c in enumerate(chans):
        for j in range(cfg.layers_per_block + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else c, c)
        if i < len(chans) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3)
        prev = c
    norm("decoder.conv_norm_out", cfg.block_out_channels[0])
    conv("decoder.conv_out", cfg.out_channels, cfg.block_out_channels[0], 3)
    return inv
