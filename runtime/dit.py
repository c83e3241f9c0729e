"""The Ideogram 4 DiT forward as one ggml graph, on whichever ggml backend is present.

The graph builder mirrors the official module tree (diffusers' ``transformer_ideogram4.py``): one builder
per module, so ``layers.N.feed_forward.w2`` is consumed in :meth:`_Modules.feed_forward`; weight types come
from the file, and on the CPU the weights are the file's memory map. A graph is built per (text length, grid) and
reused every step, a few kept (least recently used evicted); only the latents, the text features and the timestep
embedding are uploaded per call (RoPE tables once per shape). A streamed backbone (``placement="stream"``) runs the
same builders as a head graph, one block graph reused for every block, and an output graph, copying each block's
weights into one slot buffer just before it computes (docs/runtime.md "Memory modes").

Spec: ../shared/docs/ideogram4-model.md §5-§10.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import mmap
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np

from gguf_dit.arch.dit import IMAGE_POSITION_OFFSET, MAX_TEXT_TOKENS, QK_NORM_EPS, Ideogram4Config
from gguf_dit.arch.latent import PIXELS_PER_TOKEN
from gguf_dit.errors import InputError, ModelError
from gguf_dit.ggml_ops import (Backend, Builder, Context, GGMLType, Graph, Native, SharedBuffer, SharedCompute, Tensor, TensorStore, check_row, lib,
                               placed_bytes, read_into, upload)

from .gguf_file import all_finite
from .backbone_file import BackboneFile

log = logging.getLogger("gguf_dit.runtime")


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """Numerics and memory knobs. Defaults follow the official reference where it matters."""

    #: "bf16": round t to bfloat16 before the sinusoid, as the official pipeline does;
    #: "none": keep float32 t, as diffusers does in float32.
    t_rounding: str = "bf16"
    #: "flash" (ggml_flash_attn_ext where the backend supports it) or "softmax" (mul_mat + soft_max).
    attention: str = "flash"
    #: K and V are multiplied by this before attention and the output divided by it (exact in real
    #: arithmetic). None: 1 on CPU, 1/128 elsewhere, where flash attention stores K/V in F16.
    kv_scale: float | None = None
    #: "auto" (= "direct"), "direct" (quantized kernel) or "dequant" (cast to F32 in the graph: exact
    #: activations, slower). Direct beat the cast by 1.39x per step at DiT shapes on this project's CPU
    #: (docs/benchmarks.md), the opposite of the Intel micro-benchmark in gguf-and-ggml.md §8.
    q8_0_matmul: str = "auto"
    #: Run the per-sample GEMVs (timestep MLP, adaLN) on F32-cast weights: exact activations, so
    #: the conditioning path gets no 8-bit activation rounding; costs a few ms per step.
    exact_conditioning: bool = True
    #: Weights kept in their stored type compute straight from a read-only memory map of the GGUF where the backend
    #: can (the CPU; not CUDA, which copies to the device) and the data is 32-byte aligned; False copies every weight.
    #: Same bytes either way, so the same results. As with any mmap (llama.cpp's too), a file truncated or rewritten in
    #: place while mapped kills the process (SIGBUS); `convert` replaces files by rename, which is safe.
    mmap: bool = True
    #: Graphs (each with its compute buffer, ~250 MiB at 256² on the real model) kept per backbone, least recently
    #: used evicted first. One image needs one per backbone (its text length and grid), so 1 keeps memory flat
    #: across a batch of prompts of different lengths; a rebuild costs far less than one step.
    max_graphs: int = 1
    #: Where the blocks' weights live. "resident": every weight in backend memory (on the CPU: the file's memory map).
    #: "stream": only the tensors outside ``layers.N`` stay; each block's weights are copied into one slot buffer just
    #: before that block computes (head graph, one block graph per distinct block type signature, final graph), so
    #: the backend holds one block instead of all of them, at the cost of the copies (docs/runtime.md "Memory modes").
    placement: str = "resident"
    #: How a streamed block reaches a slot in host memory (the CPU): "read" (plain reads from the file into the slot:
    #: the page cache serves them and nothing of the file stays in the process) or "map" (copied from the memory map,
    #: whose touched pages count in the process's resident set). Other backends always copy from the map.
    stream_source: str = "read"

    def __post_init__(self) -> None:
        if self.t_rounding not in ("bf16", "none"):
            raise InputError(f"t_rounding must be 'bf16' or 'none', got {self.t_rounding!r}")
        if self.attention not in ("flash", "softmax"):
            raise InputError(f"attention must be 'flash' or 'softmax', got {self.attention!r}")
        if self.q8_0_matmul not in ("auto", "direct", "dequant"):
            raise InputError(f"q8_0_matmul must be auto, direct or dequant, got {self.q8_0_matmul!r}")
        if self.placement not in ("resident", "stream"):
            raise InputError(f"placement must be 'resident' or 'stream', got {self.placement!r}")
        if self.stream_source not in ("read", "map"):
            raise InputError(f"stream_source must be 'read' or 'map', got {self.stream_source!r}")
        if isinstance(self.max_graphs, bool) or not isinstance(self.max_graphs, int) or self.max_graphs < 1:
            raise InputError(f"max_graphs must be a positive integer, got {self.max_graphs!r}")
        if self.kv_scale is not None and not (self.kv_scale > 0 and math.isfinite(self.kv_scale)):
            raise InputError(f"kv_scale must be a positive number, got {self.kv_scale}")


def timestep_embedding(t: float, dim: int, rounding: str = "bf16") -> np.ndarray:
    """The official EmbedScalar sinusoid: u = 1e4·t, freq_k = exp(−k·ln(1e4)/(half−1)), [sin, cos].

    Computed with torch float32 ops in the reference's order, so the high-frequency phases
    (|u·freq| up to 1e4 rad, where one float32 ulp is ~1e-3 rad) match bit for bit.
    """
    import torch

    tt = torch.tensor([float(t)], dtype=torch.float32)
    if rounding == "bf16":
        tt = tt.to(torch.bfloat16)
    x = tt.to(torch.float32)
    scaled = 1e4 * (x - 0.0) / (1.0 - 0.0)
    half = dim // 2
    freq = math.log(1e4) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -freq)
    emb = scaled.unsqueeze(-1) * freqs
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb[0].numpy().astype(np.float32)


def positions(n_text: int, grid_h: int, grid_w: int) -> np.ndarray:
    """(L, 3) int64 (t, h, w): text token i at (i, i, i); image (y, x) at 65536 + (0, y, x)."""
    pos = np.zeros((n_text + grid_h * grid_w, 3), dtype=np.int64)
    pos[:n_text] = np.arange(n_text)[:, None]
    yy, xx = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    pos[n_text:, 0] = IMAGE_POSITION_OFFSET
    pos[n_text:, 1] = IMAGE_POSITION_OFFSET + yy.reshape(-1)
    pos[n_text:, 2] = IMAGE_POSITION_OFFSET + xx.reshape(-1)
    return pos


def rope_tables(pos: np.ndarray, cfg: Ideogram4Config) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (L, head_dim) for the 3-axis interleaved MRoPE, fp32 angles (§7).

    Frequency slot j takes the H axis when j ≡ 1 (mod 3) and j < 3·sections[1], the W axis when
    j ≡ 2 (mod 3) and j < 3·sections[2], the T axis otherwise; the 128 frequencies are duplicated
    [f, f] for rotate-half (NeoX) pairing of dims d and d + 128.
    """
    import torch

    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    p = torch.from_numpy(pos.T.astype(np.float32))  # (3, L)
    freqs = p[:, :, None] * inv_freq[None, None, :]  # (3, L, hd/2), one float32 product each
    f = freqs[0].clone()
    for axis, offset in ((1, 1), (2, 2)):
        idx = torch.arange(offset, cfg.mrope_section[axis] * 3, 3)
        f[:, idx] = freqs[axis][:, idx]
    emb = torch.cat([f, f], dim=-1)
    return emb.cos().numpy().astype(np.float32), emb.sin().numpy().astype(np.float32)


class Ideogram4DiT:
    """One Ideogram 4 backbone resident on a ggml backend: linears in their GGUF storage types, norm weights,
    biases and the image-indicator embedding in F32."""

    #: The graph's builders. A subclass may extend them (e.g. calibration adds per-linear activation statistics as
    #: extra graph outputs, read with ``last_outputs``); the forward itself stays in one place.
    modules_class: type["_Modules"]

    def __init__(self, file: BackboneFile, backend: Backend, options: RuntimeOptions | None = None, *,
                 replace: dict[str, tuple[GGMLType, np.ndarray]] | None = None) -> None:
        """``replace``: linear weight name -> (type, bytes in ggml layout) used instead of the file's tensor (e.g. one
        linear re-quantized, to measure what quantizing it alone costs)."""
        self.file, self.path, self.config, self.role = file, file.path, file.config, file.role
        self.backend, self.options = backend, options or RuntimeOptions()
        for w in file.warnings:
            log.warning("%s: %s", self.path, w)
        replace = dict(replace or {})
        for n, (type_, data) in replace.items():
            if file.kinds.get(n) != "linear":
                raise InputError(f"{self.path}: only linear weights can be replaced, not {n!r}")
            ne = file.tensors[n].ne
            check_row(type_, ne[0], what=f"{self.path}: tensor {n}: ")
            if data.nbytes != type_.nbytes(ne):
                raise InputError(f"{self.path}: tensor {n}: {data.nbytes} bytes given for {type_.name} ne={ne}")
        specs = self._specs(replace)
        self._check_backend(specs)
        resident, blocks = _split(specs, self.options.placement == "stream")
        mappable = {n: a for n, a in self._mappable(resident).items() if n not in replace} if self.options.mmap else None
        self.weights = TensorStore(backend, resident, host=mappable)
        self._stream: _BlockStream | None = None
        self._log_copies()
        with file.open() as f:
            if blocks:
                self._stream = _BlockStream(self, blocks, replace, f)
            for n, type_, _ in resident:
                t = file.tensors[n]
                if n in self.weights.mapped:
                    data = t.data.view(np.uint8)
                elif n in replace:
                    data = np.ascontiguousarray(replace[n][1]).view(np.uint8)
                else:
                    data = file.read_bytes(n, f) if t.type is type_ else file.read_f32(n, f)
                # Checked here, not from the velocity: a quantized block with an Inf scale gives finite garbage.
                if not _finite(type_, data.view(np.uint8)):
                    raise ModelError("non-finite values (NaN/Inf) in the weights", path=self.path, tensor=n)
                if n not in self.weights.mapped:
                    upload(self.weights[n], data)
        self._graphs: OrderedDict[tuple[int, int, int], Graph] = OrderedDict()
        # Text features stay the same for every step of an image: a read-only array already uploaded
        # to a graph is not uploaded again (a writeable one always is: it may have changed in place).
        self._uploaded_text: dict[tuple[int, int, int], np.ndarray] = {}
        log.info("loaded %s: %s", self.path, self.summary())

    # -- loading -----------------------------------------------------------------------
    def _specs(self, replace: dict) -> list[tuple[str, GGMLType, tuple[int, ...]]]:
        # Linears stay in their stored type (mul_mat takes any); every other tensor is an F32 operand
        # of an elementwise op and is widened to F32 here, as stable-diffusion.cpp does.
        kinds = self.file.kinds
        return [(n, replace[n][0] if n in replace else t.type if kinds[n] == "linear" else GGMLType.F32, t.ne) for n, t in self.file.tensors.items()]

    def _mappable(self, specs: list[tuple[str, GGMLType, tuple[int, ...]]]) -> dict[str, np.ndarray]:
        """The file's memory-mapped bytes of each tensor the graph uses in its stored type (the widened ones are
        decoded copies). The header checked every range against the file's size; a map shorter than that (the
        file shrank since) is refused here, before ggml is given a pointer."""
        out = {}
        for n, type_, _ in specs:
            t = self.file.tensors[n]
            if t.type is type_:
                if t.data.nbytes != t.nbytes:
                    raise ModelError("file ends inside the tensor data (truncated?)", path=self.path, tensor=n)
                out[n] = t.data
        return out

    def _log_copies(self) -> None:
        reasons = self.weights.copy_reasons
        if self.weights.mapped:
            log.info("%s: %.1f MiB of weights computed from the file's memory map", self.path, self.weights.mapped_bytes / 2**20)
        if reasons:
            name, why = next(iter(reasons.items()))
            log.info("%s: %d tensors copied instead of memory-mapped (%s: %s)", self.path, len(reasons), name, why)

    def _check_backend(self, specs: list[tuple[str, GGMLType, tuple[int, ...]]]) -> None:
        """Refuse, naming the tensor, a weight type the backend has no matmul for (CUDA lacks some
        that the CPU has), before anything is allocated."""
        first: dict[GGMLType, tuple[str, tuple[int, ...]]] = {}
        for name, type_, ne in specs:
            if len(name.encode()) > 63:
                raise ModelError("tensor name longer than ggml's 63 characters", path=self.path, tensor=name)
            if self.file.kinds[name] == "linear":
                first.setdefault(type_, (name, ne))
        ctx = Context(3 * len(first))  # weight, activations and product per type
        try:
            b = Builder(ctx)
            for type_, (name, ne) in first.items():
                if not self.backend.supports(b.mul_mat(ctx.new_tensor(type_, ne), ctx.new_tensor(GGMLType.F32, (ne[0], 1)))):
                    raise ModelError(f"stored as {type_.name}, which backend {self.backend.name} has no matmul for", path=self.path, tensor=name)
        finally:
            ctx.close()

    @classmethod
    def load(cls, path: str | Path, backend: Backend | str = "auto", *, threads: int | None = None, options: RuntimeOptions | None = None) -> "Ideogram4DiT":
        be = backend if isinstance(backend, Backend) else Backend(backend, threads=threads)
        return cls(BackboneFile(path, strict=True), be, options)

    @classmethod
    def measure(cls, file: BackboneFile, options: RuntimeOptions | None = None, *, n_text: int, grid: tuple[int, int]) -> dict[str, int]:
        """What this backbone would hold on a backend, without reading a weight or allocating a compute buffer:
        ``weights`` (backend memory: all of them, or the non-block ones plus the slot), ``streamed`` (bytes copied
        into the slot per forward), ``host`` (host copies a streamed backbone keeps: widened or replaced tensors),
        ``compute`` (ggml's allocator sizing every graph of one forward) and ``inputs`` (graph inputs and state).
        The graphs are sized on the CPU backend, their weights aliasing one never-touched anonymous mapping."""
        self = cls.__new__(cls)
        self.file, self.path, self.config, self.role = file, file.path, file.config, file.role
        self.options, self.backend = options or RuntimeOptions(), Backend("cpu", threads=1)
        specs = self._specs({})
        self._check_backend(specs)
        resident, blocks = _split(specs, self.options.placement == "stream")
        sizes = {n: type_.nbytes(ne) for n, type_, ne in specs}
        anon = np.frombuffer(mmap.mmap(-1, max(sizes.values())), dtype=np.uint8)
        self.weights = TensorStore(self.backend, resident, host={n: anon[: sizes[n]] for n, _, _ in resident})
        self._stream = _BlockStream(self, blocks, {}, None) if blocks else None
        try:
            g = self._build(n_text, *grid, measure_only=True)
            out = {"weights": sum(sizes[n] for n, _, _ in resident) + (self._stream.buffer.nbytes if self._stream else 0),
                   "streamed": sum(sizes[n] for sp in blocks.values() for n, _, _ in sp), "compute": g.compute_bytes,
                   "inputs": g.input_bytes, "host": sum(sizes[n] for sp in blocks.values() for n, t, _ in sp if file.tensors[n].type is not t)}
            g.close()
            return out
        finally:
            if self._stream:
                self._stream.close()
            self.weights.close()
            self.backend.close()

    def summary(self) -> dict:
        types: dict[str, dict[str, int]] = {}
        for n, type_, ne in self._specs({}):
            d = types.setdefault((self.weights[n].type if n in self.weights else self._stream.type_of(n)).name, {"count": 0, "bytes": 0})
            d["count"] += 1
            d["bytes"] += type_.nbytes(ne) if n not in self.weights else self.weights[n].nbytes
        st = self._stream
        return {"file": str(self.path), "role": self.role, "backend": self.backend.name, "device": self.backend.device_name,
                "placement": self.options.placement, "weight_bytes": self.weights.nbytes + (st.buffer.nbytes if st else 0),
                "streamed_bytes": st.streamed_bytes if st else 0, "mapped_bytes": self.weights.mapped_bytes, "types": types,
                "config": self.config.to_metadata()}

    def close(self) -> None:
        for g in self._graphs.values():
            g.close()
        self._graphs.clear()
        self._uploaded_text.clear()
        if self._stream is not None:
            self._stream.close()
        self.weights.close()

    # -- graph -------------------------------------------------------------------------
    def graph_size(self) -> int:
        """ggml graph capacity (nodes) for one forward; a modules_class that adds nodes raises it."""
        return 512 + 160 * self.config.num_layers

    def _graph(self, n_text: int, grid_h: int, grid_w: int) -> Graph:
        key = (n_text, grid_h, grid_w)
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        while len(self._graphs) >= self.options.max_graphs:  # freed before the new one is allocated: flat peak
            old, g = self._graphs.popitem(last=False)
            self._uploaded_text.pop(old, None)
            g.close()
            log.debug("evicted graph %s", old)
        g = self._build(n_text, grid_h, grid_w)
        cos, sin = rope_tables(positions(n_text, grid_h, grid_w), self.config)
        sin[:, : self.config.head_dim // 2] *= -1.0  # rotate_half's sign, see _Modules.rope
        g.set("cos", cos)
        g.set("sin", sin)
        self._graphs[key] = g
        log.debug("built graph %s: %d nodes, compute buffer %.1f MiB", key, g.n_nodes, g.compute_bytes / 2**20)
        return g

    def _inputs(self, n_text: int, n_img: int) -> list[tuple[str, GGMLType, tuple[int, ...]]]:
        cfg = self.config
        shapes = {"x": (cfg.in_channels, n_img), "temb": (cfg.emb_dim, 1)}
        if n_text:
            shapes["text"] = (cfg.llm_features_dim, n_text)
        return [(name, GGMLType.F32, ne) for name, ne in shapes.items()]

    def _build(self, n_text: int, grid_h: int, grid_w: int, measure_only: bool = False) -> "Graph | _Streamed":
        if self._stream is not None:
            return _Streamed(self, n_text, grid_h * grid_w, measure_only)
        L, hd = n_text + grid_h * grid_w, self.config.head_dim
        inputs = self._inputs(n_text, grid_h * grid_w) + [("cos", GGMLType.F32, (hd, 1, L)), ("sin", GGMLType.F32, (hd, 1, L))]
        g = Graph(self.backend, inputs, lambda b, i: self.modules_class(self, b).transformer(i, n_text), graph_size=self.graph_size(), measure_only=measure_only)
        g.input_bytes = g.inputs.nbytes
        return g

    # -- forward -----------------------------------------------------------------------
    def velocity(self, latent_tokens: np.ndarray, t: float, text_features: np.ndarray | None = None, *, grid: tuple[int, int]) -> np.ndarray:
        """Velocity at the image tokens, float32 (N, in_channels).

        ``latent_tokens``: (N, C) or (1, N, C) noisy latents, N = grid_h·grid_w in row-major order.
        ``text_features``: (n_text, llm_features_dim) or (1, n_text, F) for the conditional sequence
        (text tokens first), or None for the image-only unconditional sequence.
        """
        cfg = self.config
        grid_h, grid_w = (int(v) for v in grid)
        if grid_h < 1 or grid_w < 1:
            raise InputError(f"grid must be positive, got {grid}")
        x = np.asarray(latent_tokens, dtype=np.float32)
        if x.ndim == 3:
            if x.shape[0] != 1:
                raise InputError(f"only batch 1 is supported, latents have batch {x.shape[0]}")
            x = x[0]
        if x.ndim != 2 or x.shape != (grid_h * grid_w, cfg.in_channels):
            raise InputError(
                f"latent tokens have shape {tuple(np.shape(latent_tokens))}, expected ({grid_h * grid_w}, {cfg.in_channels}) "
                f"for a {grid_h}x{grid_w} token grid ({grid_h * PIXELS_PER_TOKEN}x{grid_w * PIXELS_PER_TOKEN} px)"
            )
        if not np.isfinite(x).all():
            raise InputError("latent tokens contain NaN or Inf")
        n_text, feats = 0, None
        if text_features is not None:
            feats = np.asarray(text_features, dtype=np.float32)
            if feats.ndim == 3 and feats.shape[0] == 1:
                feats = feats[0]
            if feats.ndim != 2 or feats.shape[1] != cfg.llm_features_dim:
                raise InputError(f"text features have shape {tuple(np.shape(text_features))}, expected (n_text, {cfg.llm_features_dim})")
            n_text = feats.shape[0]
            if n_text > MAX_TEXT_TOKENS:
                raise InputError(f"{n_text} text tokens exceed the model's maximum of {MAX_TEXT_TOKENS}")
            if n_text == 0:
                feats = None
        if not (0.0 <= float(t) <= 1.0):
            raise InputError(f"t must be in [0, 1] (0 = noise, 1 = clean), got {t}")
        key = (n_text, grid_h, grid_w)
        g = self._graph(*key)
        head = g.head if isinstance(g, _Streamed) else g
        head.set("x", np.ascontiguousarray(x))
        head.set("temb", timestep_embedding(float(t), cfg.emb_dim, self.options.t_rounding))
        if feats is not None and not (self._uploaded_text.get(key) is feats and not feats.flags.writeable):
            head.set("text", np.ascontiguousarray(feats))
            self._uploaded_text[key] = feats
        g.compute()
        # its other outputs (a modules_class's extra statistics) stay readable until the next call
        self.last_graph = g.final if isinstance(g, _Streamed) else g
        return self.last_graph.get("v")


def _finite(type_: GGMLType, raw: np.ndarray, chunk: int = 16 << 20) -> bool:
    """``all_finite`` a few MiB of whole blocks at a time: on a memory map, one bit-mask temporary per chunk rather
    than one the size of the tensor."""
    step = max(1, chunk // type_.type_size) * type_.type_size
    return all(all_finite(type_, raw[o : o + step]) for o in range(0, raw.size, step))


class _Modules:
    """One graph's builders, one per module of diffusers' ``transformer_ideogram4.py``; each consumes its own
    tensors by their GGUF (= official) names. ``p`` is a block's path, ``layers.N``."""

    def __init__(self, dit: Ideogram4DiT, b: Builder) -> None:
        self.b, self.cfg, self.options, self.backend, self.weights = b, dit.config, dit.options, dit.backend, dit.weights

    # -- leaves ------------------------------------------------------------------------
    def linear(self, name: str, x: Tensor, *, per_sample: bool = False) -> Tensor:
        """nn.Linear on any stored type. A quantized weight is cast to F32 in the graph (exact activations, no
        8-bit rounding) for the per-sample conditioning GEMVs, or for Q8_0 when asked; never where the backend
        cannot cast it."""
        b, opts = self.b, self.options
        w = wt = self.weights[name + ".weight"]
        traits = w.type.traits
        exact = (per_sample and opts.exact_conditioning) or (w.type is GGMLType.Q8_0 and opts.q8_0_matmul == "dequant")
        if traits.quantized and exact:
            cast = b.cast(w, GGMLType.F32)
            wt = cast if self.backend.supports(cast) else w
        y = b.mul_mat(wt, x, f32_acc=traits.f32_acc)
        return b.add(y, self.weights[name + ".bias"]) if name + ".bias" in self.weights else y

    def rms_norm(self, name: str, x: Tensor, eps: float) -> Tensor:
        return self.b.mul(self.b.rms_norm(x, eps), self.weights[name + ".weight"])

    def rope(self, x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
        # x·cos + rotate_half(x)·sin, with rotate_half(x)·sin = swap_halves(x)·[−sin, sin].
        b = self.b
        half, H, L = x.ne[0] // 2, x.ne[1], x.ne[2]
        lo = b.view(x, (half, H, L), (x.nb[1], x.nb[2]), 0)
        hi = b.view(x, (half, H, L), (x.nb[1], x.nb[2]), half * 4)
        return b.add(b.mul(x, cos), b.mul(b.concat(hi, lo, 0), sin_signed))

    def sdpa(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Scaled dot-product attention, q, k, v ne=[hd, H, L] -> ne=[H·hd, L]."""
        b = self.b
        hd, H, L = q.ne[:3]
        scale = 1.0 / math.sqrt(hd)
        s = self.options.kv_scale or (1.0 if self.backend.is_cpu else 1.0 / 128.0)  # kv_scale is None or > 0
        if s != 1.0:
            k, v = b.scale(k, s), b.scale(v, s)
        qp, kp, vp = (b.permute(t, 0, 2, 1, 3) for t in (q, k, v))  # [hd, L, H]
        out = None
        if self.options.attention == "flash":
            fa = b.flash_attn(qp, kp, vp, scale / s)  # [hd, H, L]
            if self.backend.supports(fa):
                out = b.reshape(fa, hd * H, L)
        if out is None:
            kq = b.soft_max(b.mul_mat(kp, qp), scale / s)  # [Lk, Lq, H]
            vt = b.cont(b.permute(v, 1, 2, 0, 3))  # [L, hd, H]
            o = b.mul_mat(vt, kq)  # [hd, Lq, H]
            out = b.reshape(b.cont(b.permute(o, 0, 2, 1, 3)), hd * H, L)
        return b.scale(out, 1.0 / s) if s != 1.0 else out

    # -- official modules --------------------------------------------------------------
    def attention(self, p: str, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Ideogram4Attention: fused qkv, per-head RMSNorm on q and k, MRoPE, SDPA, o."""
        b, cfg = self.b, self.cfg
        D, hd, H, L = cfg.emb_dim, cfg.head_dim, cfg.num_heads, x.ne[1]
        qkv = self.linear(f"{p}.attention.qkv", x)  # [3D, L]: q rows, then k, then v
        heads = lambda i: b.view(qkv, (hd, H, L), (hd * 4, qkv.nb[1]), i * D * 4)  # noqa: E731
        q = self.rope(self.rms_norm(f"{p}.attention.norm_q", heads(0), QK_NORM_EPS), cos, sin)
        k = self.rope(self.rms_norm(f"{p}.attention.norm_k", heads(1), QK_NORM_EPS), cos, sin)
        return self.linear(f"{p}.attention.o", self.sdpa(q, k, heads(2)))

    def feed_forward(self, p: str, x: Tensor) -> Tensor:
        """Ideogram4MLP (SwiGLU): w2(silu(w1 x) · w3 x)."""
        gated = self.b.swiglu(self.linear(f"{p}.feed_forward.w1", x), self.linear(f"{p}.feed_forward.w3", x))
        return self.linear(f"{p}.feed_forward.w2", gated)

    def adaln_modulation(self, p: str, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The block's modulation, each [D, 1]: 1 + scale_msa, tanh(gate_msa), 1 + scale_mlp, tanh(gate_mlp)."""
        b, D = self.b, self.cfg.emb_dim
        mod = self.linear(f"{p}.adaln_modulation", c, per_sample=True)
        chunk = lambda i: b.view(mod, (D, 1), (mod.nb[1],), i * D * 4)  # noqa: E731
        return b.scale_bias(chunk(0), 1.0, 1.0), b.tanh(chunk(1)), b.scale_bias(chunk(2), 1.0, 1.0), b.tanh(chunk(3))

    def block(self, p: str, h: Tensor, c: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Ideogram4TransformerBlock: sandwich RMSNorms around attention and feed-forward, scaled and gated by c."""
        b, cfg = self.b, self.cfg
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaln_modulation(p, c)
        attn = self.attention(p, b.mul(self.rms_norm(f"{p}.attention_norm1", h, cfg.norm_eps), scale_msa), cos, sin)
        h = b.add(h, b.mul(self.rms_norm(f"{p}.attention_norm2", attn, cfg.norm_eps), gate_msa))
        ff = self.feed_forward(p, b.mul(self.rms_norm(f"{p}.ffn_norm1", h, cfg.norm_eps), scale_mlp))
        return b.add(h, b.mul(self.rms_norm(f"{p}.ffn_norm2", ff, cfg.norm_eps), gate_mlp))

    def t_embedding(self, sinusoid: Tensor) -> Tensor:
        """Ideogram4EmbedScalar's MLP, on the sinusoid computed on the host (:func:`timestep_embedding`)."""
        return self.linear("t_embedding.mlp_out", self.b.silu(self.linear("t_embedding.mlp_in", sinusoid, per_sample=True)), per_sample=True)

    def final_layer(self, h: Tensor, c: Tensor) -> Tensor:
        """Ideogram4FinalLayer: LayerNorm without affine, times 1 + adaln_modulation(silu(c)), then linear."""
        b, cfg = self.b, self.cfg
        scale = b.scale_bias(self.linear("final_layer.adaln_modulation", b.silu(c), per_sample=True), 1.0, 1.0)
        return self.linear("final_layer.linear", b.mul(b.norm(h, cfg.final_norm_eps), scale))

    def transformer(self, inp: dict[str, Tensor], n_text: int) -> dict[str, Tensor]:
        """Ideogram4Transformer2DModel on [text tokens, image tokens]; the velocity of the image tokens. A streamed
        backbone runs the same three parts (head, each block, output) as separate graphs."""
        h, c = self.head(inp, n_text)
        for n in range(self.cfg.num_layers):
            h = self.block(f"layers.{n}", h, c, inp["cos"], inp["sin"])
        return {"v": self.output(h, c, n_text, inp["x"].ne[1])}

    def head(self, inp: dict[str, Tensor], n_text: int) -> tuple[Tensor, Tensor]:
        """The token sequence [text, image] entering the first block, and c, every block's modulation input."""
        b, cfg = self.b, self.cfg
        D = cfg.emb_dim
        indicator = self.weights["embed_image_indicator.weight"]  # ne [D, 2]: row 0 text/pad, row 1 image
        h = b.add(self.linear("input_proj", inp["x"]), b.view(indicator, (D,), (), D * 4))
        if n_text:
            text = self.linear("llm_cond_proj", self.rms_norm("llm_cond_norm", inp["text"], cfg.llm_cond_norm_eps))
            h = b.concat(b.add(text, b.view(indicator, (D,), (), 0)), h, 1)
        return h, b.silu(self.linear("adaln_proj", self.t_embedding(inp["temb"]), per_sample=True))

    def output(self, h: Tensor, c: Tensor, n_text: int, n_img: int) -> Tensor:
        """The final layer's velocity at the image tokens, ne [C, n_img]."""
        out = self.final_layer(h, c)  # [C, L]
        return self.b.cont(self.b.view(out, (self.cfg.in_channels, n_img), (out.nb[1],), n_text * out.nb[1]))


Ideogram4DiT.modules_class = _Modules

_BLOCK = re.compile(r"layers\.(\d+)\.")


def _split(specs: list, stream: bool) -> tuple[list, dict[int, list]]:
    """The specs that stay resident, and (streamed) each block's specs by block index."""
    if not stream:
        return specs, {}
    blocks: dict[int, list] = {}
    for sp in specs:
        if m := _BLOCK.match(sp[0]):
            blocks.setdefault(int(m.group(1)), []).append(sp)
    return [sp for sp in specs if not _BLOCK.match(sp[0])], dict(sorted(blocks.items()))


class _Weights:
    """A block graph's view of the weights: the slot's tensors (named as the signature's first block) over the
    resident ones."""

    def __init__(self, *stores: TensorStore) -> None:
        self.stores = stores

    def __getitem__(self, name: str) -> Tensor:
        return next(s[name] for s in self.stores if name in s)

    def __contains__(self, name: str) -> bool:
        return any(name in s for s in self.stores)


class _BlockStream(Native):  # Native: a load that fails after __init__ still closes the file descriptor when collected
    """A streamed backbone's blocks: one slot buffer the size of the largest block, and per distinct block type
    signature a set of tensors placed in it (named as that signature's first block, whose names its block graph
    uses). ``load(N)`` fills the slot with block N's bytes: read from the file, copied from its memory map, or from a
    host copy (tensors widened to F32 at load, replaced ones). ``f`` None: shapes only, for ``Ideogram4DiT.measure``."""

    def __init__(self, dit: Ideogram4DiT, blocks: dict[int, list], replace: dict, f) -> None:
        file, backend = dit.file, dit.backend
        sigs: dict[tuple, int] = {}
        self.sig_of: list[int] = []
        self.first: list[int] = []
        self.sources: list[list] = []
        for N, specs in blocks.items():
            p = f"layers.{N}."
            sig = tuple((n[len(p):], type_, ne) for n, type_, ne in specs)
            if sig not in sigs:
                sigs[sig] = len(sigs)
                self.first.append(N)
            self.sig_of.append(sigs[sig])
            if f is None:
                continue
            srcs = []
            for n, type_, _ in specs:
                t = file.tensors[n]
                data = (np.ascontiguousarray(replace[n][1]).view(np.uint8) if n in replace else
                        None if t.type is type_ else file.read_f32(n, f).view(np.uint8))
                # plain reads, not the map: scanning must not leave the whole file in this process's resident set
                ok = all(all_finite(type_, raw) for raw in file.row_chunks(n, f, 16 << 20)) if data is None else _finite(type_, data)
                if not ok:
                    raise ModelError("non-finite values (NaN/Inf) in the weights", path=dit.path, tensor=n)
                srcs.append(t if data is None else data)
            self.sources.append(srcs)
        align = int(lib.ggml_backend_buft_get_alignment(backend.buffer_type))
        self.streamed_bytes = sum(type_.nbytes(ne) for sp in blocks.values() for _, type_, ne in sp)
        probe = Context(sum(len(sig) for sig in sigs))
        try:  # each signature's tensors as TensorStore(into=) places them (CUDA pads quantized rows)
            need = [sum(-(-placed_bytes(backend, probe.new_tensor(t, ne)) // align) * align for _, t, ne in sig) for sig in sigs]
        finally:
            probe.close()
        self.buffer = SharedBuffer(backend, max(need))
        self.slots = [TensorStore(backend, [(f"layers.{self.first[i]}.{sfx}", t, ne) for sfx, t, ne in sig], into=self.buffer)
                      for i, sig in enumerate(sigs)]
        self.read = self.buffer.is_host and dit.options.stream_source == "read"
        self.fd = os.dup(f.fileno()) if f is not None else None
        self.loaded: int | None = None
        self.sig: int | None = None  # the signature whose tensors the slot holds

    def type_of(self, name: str) -> GGMLType:
        N = int(_BLOCK.match(name).group(1))
        return self.slots[self.sig_of[N]][f"layers.{self.first[self.sig_of[N]]}.{name[_BLOCK.match(name).end():]}"].type

    def load(self, N: int) -> None:
        if self.loaded == N:  # a one-block model keeps its block in the slot
            return
        self.loaded, slot = None, self.slots[self.sig_of[N]]
        if self.sig != self.sig_of[N] and not self.buffer.is_host:
            # another signature's bytes now lie in this one's row padding (CUDA): ggml zeroes it again, else NaN
            for t in slot.tensors.values():
                lib.ggml_backend_buffer_init_tensor(self.buffer.buffer, t.ptr)
        self.sig = self.sig_of[N]
        for t, src in zip(slot.tensors.values(), self.sources[N]):
            if isinstance(src, np.ndarray):
                upload(t, src)
            elif self.read:
                read_into(t, self.fd, src.offset)
            else:
                upload(t, src.data.view(np.uint8))
        self.loaded = N

    def close(self) -> None:
        for s in self.slots:
            s.close()
        self.buffer.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Streamed:
    """One shape's graphs for a streamed backbone: head, one block graph per block type signature, output. They pass
    h and c through a persistent state store on the backend (each graph ends by copying its result there), so
    nothing returns to the host between blocks."""

    def __init__(self, dit: Ideogram4DiT, n_text: int, n_img: int, measure_only: bool) -> None:
        cfg, be, st = dit.config, dit.backend, dit._stream
        L, D, hd = n_text + n_img, cfg.emb_dim, cfg.head_dim
        self.dit = dit
        self.state = TensorStore(be, [("h", GGMLType.F32, (D, L)), ("c", GGMLType.F32, (cfg.adaln_dim, 1)), ("cos", GGMLType.F32, (hd, 1, L)),
                                      ("sin", GGMLType.F32, (hd, 1, L))], usage_weights=False)
        s = self.state.tensors
        kw = {"graph_size": dit.graph_size(), "allocate": False}

        def head(b: Builder, inp: dict[str, Tensor]) -> dict[str, Tensor]:
            h, c = dit.modules_class(dit, b).head(inp, n_text)
            return {"h": b.cpy(h, s["h"]), "c": b.cpy(c, s["c"])}

        def block(first: int, slot: TensorStore, b: Builder, _) -> dict[str, Tensor]:
            m = dit.modules_class(dit, b)
            m.weights = _Weights(slot, dit.weights)
            return {"h": b.cpy(m.block(f"layers.{first}", s["h"], s["c"], s["cos"], s["sin"]), s["h"])}

        self.head = Graph(be, dit._inputs(n_text, n_img), head, **kw)
        self.blocks = [Graph(be, [], functools.partial(block, first, slot), **kw) for first, slot in zip(st.first, st.slots)]
        self.final = Graph(be, [], lambda b, _: {"v": dit.modules_class(dit, b).output(s["h"], s["c"], n_text, n_img)}, **kw)
        self.graphs = [self.head, *self.blocks, self.final]
        self.n_nodes = sum(g.n_nodes for g in self.graphs)
        # They run one after another, so one compute buffer, the size of the largest graph's, serves them all.
        self.shared = None if measure_only else SharedCompute(be, self.graphs)
        self.compute_bytes = max(g.compute_bytes for g in self.graphs)
        self.input_bytes = self.state.nbytes + self.head.inputs.nbytes

    def set(self, name: str, data: np.ndarray) -> None:
        upload(self.state[name], data)

    def compute(self) -> None:
        st = self.dit._stream
        self.head.compute()
        for N, sig in enumerate(st.sig_of):
            st.load(N)
            self.blocks[sig].compute()
        self.final.compute()

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()
        for g in self.graphs:
            g.close()
        self.state.close()


def check_pair(cond: Ideogram4DiT, uncond: Ideogram4DiT) -> None:
    """A CFG pair must share one architecture; roles, when recorded, must be cond and uncond."""
    if cond.config != uncond.config:
        diff = [f.name for f in dataclasses.fields(Ideogram4Config) if getattr(cond.config, f.name) != getattr(uncond.config, f.name)]
        d = diff[0]
        raise ModelError(f"conditional and unconditional backbones differ in {d}: "
                         f"{getattr(cond.config, d)} ({cond.path}) vs {getattr(uncond.config, d)} ({uncond.path})")
    if cond.role == "uncond":
        raise ModelError("given as the conditional backbone but its metadata says role=uncond", path=cond.path)
    if uncond.role == "cond":
        raise ModelError("given as the unconditional backbone but its metadata says role=cond", path=uncond.path)
    if cond.backend is not uncond.backend and cond.backend.name != uncond.backend.name:
        raise ModelError("the two backbones live on different backends")


__all__ = ["Ideogram4DiT", "RuntimeOptions", "check_pair", "positions", "rope_tables", "timestep_embedding"]
