"""The FLUX.2 VAE decoder as PyTorch modules (diffusers' ``AutoencoderKLFlux2`` decoder path), split into the part
that runs at latent resolution (``low``) and the high-resolution up path (``high``) that tiled decoding windows.

Module attribute names follow the stored (diffusers) tensor names, so the file's tensors load by name."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gguf_dit.arch.vae import NORM_EPS, VAEConfig


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class _SelfAttention(nn.Module):
    """Single-head self-attention over all latent pixels, GroupNorm first, residual added."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=NORM_EPS)
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # (b, h*w, c)
        q, k, v = (m(t).unsqueeze(1) for m in (self.to_q, self.to_k, self.to_v))
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # scale 1/sqrt(c): one head of width c
        o = self.to_out[0](o)
        return x + o.transpose(1, 2).reshape(b, c, h, w)


class _MidBlock(nn.Module):
    def __init__(self, c: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([_ResBlock(c, c, groups), _ResBlock(c, c, groups)])
        self.attentions = nn.ModuleList([_SelfAttention(c, groups)]) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class _Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([_ResBlock(cin if j == 0 else cout, cout, groups) for j in range(n)])
        self.upsamplers = nn.ModuleList([_Upsample(cout)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class _Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g = cfg.norm_num_groups
        chans = list(reversed(cfg.block_out_channels))
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        self.mid_block = _MidBlock(chans[0], g, cfg.mid_block_add_attention)
        blocks, prev = [], chans[0]
        for i, c in enumerate(chans):
            blocks.append(_UpBlock(prev, c, cfg.layers_per_block + 1, g, upsample=i < len(chans) - 1))
            prev = c
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = nn.GroupNorm(g, cfg.block_out_channels[0], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(cfg.block_out_channels[0], cfg.out_channels, 3, padding=1)

    def low(self, z: torch.Tensor) -> torch.Tensor:
        """conv_in and the mid block: latent resolution, global (self-attention over every latent pixel)."""
        return self.mid_block(self.conv_in(z))

    def high(self, x: torch.Tensor) -> torch.Tensor:
        """Up blocks, output norm and conv: all the high-resolution (memory-heavy) work; local apart from GroupNorm."""
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAEDecoderModule(nn.Module):
    """``post_quant_conv`` (optional, 1x1) followed by the decoder. Input (B, latent_channels, h, w) -> (B, 3, 8h, 8w)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1) if cfg.use_post_quant_conv else None
        self.decoder = _Decoder(cfg)

    def low(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder.low(z)

    def high(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder.high(x)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.high(self.low(z))
