"""Contexts, tensors, backend buffers, graphs and the ops a DiT needs.

Each op checks its operands in Python first: ggml reports a bad shape or type with GGML_ASSERT,
which aborts the whole interpreter. Shapes are ggml ``ne`` order (fastest dimension first).
"""

from __future__ import annotations

import ctypes
import math
import os
from typing import Callable, Sequence

import numpy as np

from gguf_dit.errors import GGMLError

from ._lib import Native, ggml_init_params, lib, tensor_struct
from .backend import Backend
from .types import GGMLType, check_row

_NP = {GGMLType.F32: np.float32, GGMLType.F16: np.float16}
GGML_PREC_F32 = 10


class Tensor:
    """A handle on a ``ggml_tensor``; keeps its owner alive."""

    __slots__ = ("ptr", "owner")

    def __init__(self, ptr: int, owner: object) -> None:
        if not ptr:
            raise GGMLError("ggml returned a NULL tensor")
        self.ptr = ptr
        self.owner = owner

    def __int__(self) -> int:
        return self.ptr

    @property
    def _s(self):
        return tensor_struct(self.ptr)

    @property
    def ne(self) -> tuple[int, int, int, int]:
        return tuple(self._s.ne)  # type: ignore[return-value]

    @property
    def nb(self) -> tuple[int, int, int, int]:
        return tuple(self._s.nb)  # type: ignore[return-value]

    @property
    def type(self) -> GGMLType:
        return GGMLType(self._s.type)

    @property
    def name(self) -> str:
        return self._s.name.decode()

    @property
    def nbytes(self) -> int:
        return int(lib.ggml_nbytes(self.ptr))

    @property
    def nelements(self) -> int:
        return math.prod(self.ne)

    @property
    def shape(self) -> tuple[int, ...]:
        """NumPy order, trailing size-1 ggml dims dropped."""
        ne = list(self.ne)
        while len(ne) > 1 and ne[-1] == 1:
            ne.pop()
        return tuple(reversed(ne))

    def is_contiguous(self) -> bool:
        ne, nb = self.ne, self.nb
        t = self.type
        if nb[0] != t.type_size:
            return False
        expect = nb[0] * ne[0] // t.block_size
        for i in range(1, 4):
            if ne[i] != 1 and nb[i] != expect:
                return False
            expect *= ne[i]
        return True

    def rows_contiguous(self) -> bool:
        return self.nb[0] == self.type.type_size

    def set_name(self, name: str) -> "Tensor":
        lib.ggml_set_name(self.ptr, name.encode()[:63])
        return self

    def __repr__(self) -> str:
        return f"Tensor({self.name!r}, {self.type.name}, ne={self.ne})"


def _ne4(ne: Sequence[int]) -> tuple[int, int, int, int]:
    ne = [int(x) for x in ne]
    if not 1 <= len(ne) <= 4 or any(x <= 0 for x in ne):
        raise GGMLError(f"invalid tensor shape {ne} (1-4 positive dims)")
    return tuple(ne + [1] * (4 - len(ne)))  # type: ignore[return-value]


class Context(Native):
    """A ``no_alloc`` ggml context: tensor metadata only; data lives in backend buffers."""

    def __init__(self, n_tensors: int, graph_size: int = 0) -> None:
        mem = (n_tensors + graph_size) * lib.ggml_tensor_overhead() + 1024
        if graph_size:
            mem += lib.ggml_graph_overhead_custom(graph_size, False)
        self.capacity = n_tensors + graph_size
        self.ptr = lib.ggml_init(ggml_init_params(mem, None, True))
        if not self.ptr:
            raise GGMLError("ggml_init failed")

    def new_tensor(self, type_: GGMLType, ne: Sequence[int], name: str | None = None) -> Tensor:
        type_ = GGMLType(type_)
        ne4 = _ne4(ne)
        check_row(type_, ne4[0], what=f"tensor {name or ''}: ")
        n_dims = len(ne)
        arr = (ctypes.c_int64 * 4)(*ne4)
        t = Tensor(lib.ggml_new_tensor(self.ptr, int(type_), n_dims, arr), self)
        if name:
            if len(name.encode()) > 63:
                raise GGMLError(f"tensor name {name!r} is longer than ggml's 63-character limit")
            t.set_name(name)
        return t

    def close(self) -> None:
        self._free("ptr", lib.ggml_free)


#: ggml's TENSOR_ALIGNMENT (ggml-impl.h): its CPU buffers place every tensor on such a boundary, and
#: ggml_backend_cpu_buffer_from_ptr aborts the process on a pointer that is not.
TENSOR_ALIGNMENT = 32


def host_alias_problem(backend: Backend, nbytes: int, data: np.ndarray) -> str | None:
    """Why a tensor of ``nbytes`` cannot compute straight from ``data``'s memory on ``backend`` (None: it can)."""
    if not backend.maps_host_memory:
        return f"backend {backend.name} cannot compute from host memory"
    if not data.flags.c_contiguous:
        return "the data is not contiguous"
    if data.nbytes != nbytes:
        return f"{data.nbytes} bytes of data for a tensor of {nbytes}"
    if data.ctypes.data % TENSOR_ALIGNMENT:
        return f"the data is not {TENSOR_ALIGNMENT}-byte aligned (address {data.ctypes.data:#x}; ggml's CPU buffers require it)"
    return None


class TensorStore(Native):
    """Named persistent tensors allocated together in one backend buffer (weights, or inputs that
    must survive graph allocation, since gallocr may reuse an input's memory after its last use).

    ``host`` (name -> array holding the tensor's bytes in ggml layout, e.g. a view of a read-only GGUF memory map):
    those tensors alias that memory instead of being allocated, where ``host_alias_problem`` finds nothing against it
    (``mapped`` lists them; ``copy_reasons`` says why each other one must be copied, and ``upload`` fills it as
    usual). The arrays are kept referenced until ``close``; ggml never writes to weights, so a read-only map is safe."""

    def __init__(self, backend: Backend, specs: Sequence[tuple[str, GGMLType, Sequence[int]]], *, usage_weights: bool = True,
                 host: dict[str, np.ndarray] | None = None, into: "SharedBuffer | None" = None) -> None:
        """``into``: place every tensor in that buffer from its start (memory other stores may alias: only one of
        them is in use at a time, e.g. the weights of one streamed block); the store then allocates nothing."""
        self.backend = backend
        self.ctx = Context(max(1, len(specs)))
        self.tensors: dict[str, Tensor] = {}
        for name, type_, ne in specs:
            if name in self.tensors:
                raise GGMLError(f"duplicate tensor name {name}")
            self.tensors[name] = self.ctx.new_tensor(type_, ne, name)
        self.buffer = None
        self._host_buffers: list[int] = []
        self._host: dict[str, np.ndarray] = {}
        self.copy_reasons: dict[str, str] = {}
        for name, data in (host or {}).items():
            t = self.tensors[name]
            if problem := host_alias_problem(backend, t.nbytes, data):
                self.copy_reasons[name] = problem
                continue
            # One buffer per tensor, exactly its bytes: nothing is assumed about the memory between two tensors.
            buf = lib.ggml_backend_dev_buffer_from_host_ptr(backend.device, data.ctypes.data, t.nbytes, t.nbytes)
            if not buf:
                raise GGMLError(f"tensor {name}: backend {backend.name} could not wrap {t.nbytes} bytes of host memory")
            self._host_buffers.append(buf)
            if usage_weights:
                lib.ggml_backend_buffer_set_usage(buf, 1)  # GGML_BACKEND_BUFFER_USAGE_WEIGHTS
            if lib.ggml_backend_tensor_alloc(buf, t.ptr, data.ctypes.data) != 0:
                raise GGMLError(f"tensor {name}: ggml could not place it in host memory")
            self._host[name] = data
        if into is not None:
            offset = 0
            for t in self.tensors.values():
                need = placed_bytes(backend, t)
                if need > into.nbytes - offset:  # checked here: ggml_backend_tensor_alloc asserts (aborts) on it
                    raise GGMLError(f"tensor {t.name}: {need} bytes do not fit the {into.nbytes}-byte shared buffer at {offset}")
                if lib.ggml_backend_tensor_alloc(into.buffer, t.ptr, into.base + offset) != 0:
                    raise GGMLError(f"tensor {t.name}: ggml could not place it in the shared buffer")
                offset += into.aligned(need)
        elif len(self._host) < len(specs):  # ggml allocates only the tensors without data
            self.buffer = lib.ggml_backend_alloc_ctx_tensors(self.ctx.ptr, backend.handle)
            if not self.buffer:
                total = sum(t.nbytes for n, t in self.tensors.items() if n not in self._host)
                raise GGMLError(f"could not allocate {total / 2**20:.1f} MiB on backend {backend.name}")
            if usage_weights:
                lib.ggml_backend_buffer_set_usage(self.buffer, 1)

    @property
    def mapped(self) -> frozenset[str]:
        """Names of the tensors that compute from host memory given at construction."""
        return frozenset(self._host)

    @property
    def mapped_bytes(self) -> int:
        return sum(a.nbytes for a in self._host.values())

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor: the allocated buffer plus the host memory aliased."""
        return (int(lib.ggml_backend_buffer_get_size(self.buffer)) if self.buffer else 0) + self.mapped_bytes

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def close(self) -> None:
        while self._host_buffers:
            lib.ggml_backend_buffer_free(self._host_buffers.pop())
        self._host.clear()
        self._free("buffer", lib.ggml_backend_buffer_free)
        self.ctx.close()


def placed_bytes(backend: Backend, t: Tensor) -> int:
    """Bytes ``t`` takes in a buffer of ``backend``: its nbytes, plus the row padding CUDA adds to quantized tensors
    whose rows are not a multiple of 512 (``ggml_backend_buft_get_alloc_size``)."""
    return int(lib.ggml_backend_buft_get_alloc_size(backend.buffer_type, t.ptr))


class SharedBuffer(Native):
    """One backend buffer of ``nbytes`` that several TensorStores place their tensors in (``TensorStore(into=)``)."""

    def __init__(self, backend: Backend, nbytes: int) -> None:
        self.alignment = int(lib.ggml_backend_buft_get_alignment(backend.buffer_type))
        self.nbytes = self.aligned(max(1, nbytes))
        self.buffer = lib.ggml_backend_buft_alloc_buffer(backend.buffer_type, self.nbytes)
        if not self.buffer:
            raise GGMLError(f"could not allocate {self.nbytes / 2**20:.1f} MiB on backend {backend.name}")
        lib.ggml_backend_buffer_set_usage(self.buffer, 1)  # weights: the scheduler's placement hint
        self.base = int(lib.ggml_backend_buffer_get_base(self.buffer))
        self.is_host = bool(lib.ggml_backend_buffer_is_host(self.buffer))

    def aligned(self, n: int) -> int:
        return -(-n // self.alignment) * self.alignment

    def close(self) -> None:
        self._free("buffer", lib.ggml_backend_buffer_free)


def read_into(t: Tensor, fd: int, offset: int) -> None:
    """Fill a tensor in host memory (a CPU buffer) with its bytes read from a file at ``offset``: straight from the
    kernel's page cache into the tensor, no intermediate copy and no pages of a file mapping left in the process."""
    buf = tensor_struct(t.ptr).buffer
    if not buf or not lib.ggml_backend_buffer_is_host(buf) or lib.ggml_backend_buft_name(lib.ggml_backend_buffer_get_type(buf)) == b"CPU_Mapped":
        raise GGMLError(f"tensor {t.name} is not in writable host memory")
    n = t.nbytes
    view = memoryview((ctypes.c_char * n).from_address(tensor_struct(t.ptr).data)).cast("B")
    done = 0
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise GGMLError(f"tensor {t.name}: file ends {n - done} bytes before the tensor does")
        done += got


def upload(t: Tensor, data: np.ndarray) -> None:
    """Copy host bytes into a tensor; the byte count must match exactly."""
    buf = tensor_struct(t.ptr).buffer
    if not buf:
        raise GGMLError(f"tensor {t.name} has no memory allocated")
    if lib.ggml_backend_buft_name(lib.ggml_backend_buffer_get_type(buf)) == b"CPU_Mapped":  # TensorStore(host=...)
        raise GGMLError(f"tensor {t.name} computes from host memory (a read-only file map) and cannot be written")
    arr = np.ascontiguousarray(data)
    if t.type in _NP and arr.dtype != np.uint8:
        want = _NP[t.type]
        if arr.dtype != want:
            raise GGMLError(f"tensor {t.name}: expected {np.dtype(want).name} data for {t.type.name}, got {arr.dtype}")
        if arr.size != t.nelements:
            raise GGMLError(f"tensor {t.name}: {arr.size} values for shape ne={t.ne}")
    if arr.nbytes != t.nbytes:
        raise GGMLError(f"tensor {t.name}: {arr.nbytes} bytes given, tensor holds {t.nbytes}")
    lib.ggml_backend_tensor_set(t.ptr, arr.ctypes.data, 0, arr.nbytes)


def download(t: Tensor) -> np.ndarray:
    """Read a contiguous F32/F16 tensor back as an array in NumPy order (ne reversed, all 4 dims squeezed to t.shape)."""
    if t.type not in _NP:
        raise GGMLError(f"tensor {t.name}: download supports F32/F16, not {t.type.name}")
    if not t.is_contiguous():
        raise GGMLError(f"tensor {t.name}: cannot download a non-contiguous view")
    out = np.empty(t.shape, dtype=_NP[t.type])
    lib.ggml_backend_tensor_get(t.ptr, out.ctypes.data, 0, out.nbytes)
    return out


class Builder:
    """Op constructors over one graph context; every op validates before calling ggml."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def _t(self, ptr: int) -> Tensor:
        return Tensor(ptr, self.ctx)

    def _f32(self, *ts: Tensor, op: str) -> None:
        for t in ts:
            if t.type is not GGMLType.F32:
                raise GGMLError(f"{op}: expects F32 operands, got {t.type.name} for {t!r}")

    # -- elementwise -------------------------------------------------------------------
    def _binary(self, fn, a: Tensor, b: Tensor, op: str) -> Tensor:
        self._f32(a, b, op=op)
        if any(x % y for x, y in zip(a.ne, b.ne)):  # ggml_can_repeat
            raise GGMLError(f"{op}: cannot broadcast ne={b.ne} onto ne={a.ne}")
        if not (a.rows_contiguous() and b.rows_contiguous()):
            raise GGMLError(f"{op}: operands must be contiguous along dim 0")
        return self._t(fn(self.ctx.ptr, a.ptr, b.ptr))

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary(lib.ggml_add, a, b, "add")

    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary(lib.ggml_mul, a, b, "mul")

    def _contiguous(self, a: Tensor) -> Tensor:
        return a if a.is_contiguous() else self.cont(a)

    def _unary(self, fn, a: Tensor, op: str, *params) -> Tensor:
        """An op on one F32 tensor (made contiguous, as ggml's kernels expect), with its scalar parameters."""
        self._f32(a, op=op)
        return self._t(fn(self.ctx.ptr, self._contiguous(a).ptr, *params))

    def silu(self, a: Tensor) -> Tensor:
        return self._unary(lib.ggml_silu, a, "silu")

    def tanh(self, a: Tensor) -> Tensor:
        return self._unary(lib.ggml_tanh, a, "tanh")

    def neg(self, a: Tensor) -> Tensor:
        return self._unary(lib.ggml_neg, a, "neg")

    def scale(self, a: Tensor, s: float) -> Tensor:
        return self._unary(lib.ggml_scale, a, "scale", float(s))

    def scale_bias(self, a: Tensor, s: float, bias: float) -> Tensor:
        """s * a + bias (e.g. the adaLN ``1 + scale``)."""
        return self._unary(lib.ggml_scale_bias, a, "scale_bias", float(s), float(bias))

    def swiglu(self, gate: Tensor, up: Tensor) -> Tensor:
        """silu(gate) * up, fused."""
        self._f32(gate, up, op="swiglu")
        if gate.ne != up.ne:
            raise GGMLError(f"swiglu: gate ne={gate.ne} and up ne={up.ne} differ")
        gate = self._contiguous(gate)
        return self._t(lib.ggml_swiglu_split(self.ctx.ptr, gate.ptr, self._contiguous(up).ptr))

    # -- normalisation -----------------------------------------------------------------
    def _norm(self, fn, a: Tensor, eps: float, op: str) -> Tensor:
        self._f32(a, op=op)
        if not a.rows_contiguous():
            raise GGMLError(f"{op}: rows must be contiguous")
        return self._t(fn(self.ctx.ptr, a.ptr, float(eps)))

    def rms_norm(self, a: Tensor, eps: float) -> Tensor:
        return self._norm(lib.ggml_rms_norm, a, eps, "rms_norm")

    def norm(self, a: Tensor, eps: float) -> Tensor:
        return self._norm(lib.ggml_norm, a, eps, "norm")

    # -- matmul ------------------------------------------------------------------------
    def mul_mat(self, w: Tensor, x: Tensor, *, f32_acc: bool = False) -> Tensor:
        """``x @ w.T``: w ne=[K, N] (any storage type), x ne=[K, T, ...] F32 -> ne=[N, T, ...]."""
        self._f32(x, op="mul_mat")
        if w.ne[0] != x.ne[0]:
            raise GGMLError(f"mul_mat: weight {w.name or ''} has K={w.ne[0]}, activations have K={x.ne[0]}")
        if x.ne[2] % w.ne[2] or x.ne[3] % w.ne[3]:
            raise GGMLError(f"mul_mat: cannot broadcast weight ne={w.ne} over ne={x.ne}")
        if w.nb[0] > w.nb[1]:
            raise GGMLError("mul_mat: transposed weight")
        out = self._t(lib.ggml_mul_mat(self.ctx.ptr, w.ptr, x.ptr))
        if f32_acc:
            lib.ggml_prec_set_acc(out.ptr, GGML_PREC_F32)
        return out

    def cpy(self, a: Tensor, dst: Tensor) -> Tensor:
        """Write ``a`` into ``dst`` (e.g. a persistent tensor that the next graph reads) as the op's result."""
        self._f32(a, dst, op="cpy")
        if a.nelements != dst.nelements or not dst.is_contiguous():
            raise GGMLError(f"cpy: {a!r} does not fit contiguous {dst!r}")
        return self._t(lib.ggml_cpy(self.ctx.ptr, a.ptr, dst.ptr))

    def cast(self, a: Tensor, type_: GGMLType) -> Tensor:
        type_ = GGMLType(type_)
        if type_ not in (GGMLType.F32, GGMLType.F16):
            raise GGMLError(f"cast: only to F32/F16, not {type_.name}")
        return self._t(lib.ggml_cast(self.ctx.ptr, a.ptr, int(type_)))

    # -- reductions (per-column statistics, e.g. calibration's) -------------------------
    def sqr(self, a: Tensor) -> Tensor:
        return self._unary(lib.ggml_sqr, a, "sqr")

    def abs(self, a: Tensor) -> Tensor:
        return self._unary(lib.ggml_abs, a, "abs")

    def sum_rows(self, a: Tensor) -> Tensor:
        """Sum along dim 0: ne=[n0, n1, ...] -> [1, n1, ...]."""
        return self._unary(lib.ggml_sum_rows, a, "sum_rows")

    def max_rows(self, a: Tensor) -> Tensor:
        """Maximum along dim 0: ne=[n0, n1, ...] -> [1, n1, ...] (ggml has no max reduction: a max pool whose one
        window is the whole row; a 2-D pool of height 1, since CUDA runs POOL_2D but not POOL_1D (ggml's docs/ops.md))."""
        self._f32(a, op="max_rows")
        if a.ne[0] >= 2**31:
            raise GGMLError(f"max_rows: rows of {a.ne[0]} exceed ggml's int pool window")
        return self._t(lib.ggml_pool_2d(self.ctx.ptr, self._contiguous(a).ptr, 0, a.ne[0], 1, a.ne[0], 1, 0.0, 0.0))  # 0: GGML_OP_POOL_MAX

    # -- layout ------------------------------------------------------------------------
    def transpose(self, a: Tensor) -> Tensor:
        """Swap dims 0 and 1 (a view; ``cont`` it before a kernel that needs contiguous rows)."""
        return self._t(lib.ggml_transpose(self.ctx.ptr, a.ptr))

    def cont(self, a: Tensor) -> Tensor:
        return self._t(lib.ggml_cont(self.ctx.ptr, a.ptr))

    def reshape(self, a: Tensor, *ne: int) -> Tensor:
        if not a.is_contiguous():
            raise GGMLError(f"reshape: {a!r} is not contiguous")
        if math.prod(ne) != a.nelements:
            raise GGMLError(f"reshape: {a.nelements} elements cannot become {ne}")
        fns = {2: lib.ggml_reshape_2d, 3: lib.ggml_reshape_3d, 4: lib.ggml_reshape_4d}
        if len(ne) not in fns:
            raise GGMLError("reshape: 2-4 dims")
        return self._t(fns[len(ne)](self.ctx.ptr, a.ptr, *[int(x) for x in ne]))

    def view(self, a: Tensor, ne: Sequence[int], nb: Sequence[int] = (), offset: int = 0) -> Tensor:
        """A strided view; ``nb`` gives strides for dims 1.. (bytes), ``offset`` in bytes."""
        ne = [int(x) for x in ne]
        nb = [int(x) for x in nb]
        if len(nb) != len(ne) - 1:
            raise GGMLError(f"view: {len(ne)} dims need {len(ne) - 1} strides")
        if not 1 <= len(ne) <= 4:
            raise GGMLError("view: 1-4 dims")
        if a.type.block_size != 1:
            raise GGMLError("view: only unquantized tensors")
        esize = a.type.type_size
        last = offset + (ne[0] - 1) * esize + sum((n - 1) * s for n, s in zip(ne[1:], nb)) + esize
        if offset < 0 or last > a.nbytes:
            raise GGMLError(f"view: ne={ne} nb={nb} offset={offset} exceeds {a.nbytes} bytes of {a!r}")
        fn = (lib.ggml_view_1d, lib.ggml_view_2d, lib.ggml_view_3d, lib.ggml_view_4d)[len(ne) - 1]
        return self._t(fn(self.ctx.ptr, a.ptr, *ne, *nb, offset))  # ne0.., nb1.., offset: ggml's argument order

    def permute(self, a: Tensor, *axes: int) -> Tensor:
        if sorted(axes) != [0, 1, 2, 3]:
            raise GGMLError(f"permute: {axes} is not a permutation of 0..3")
        return self._t(lib.ggml_permute(self.ctx.ptr, a.ptr, *axes))

    def concat(self, a: Tensor, b: Tensor, dim: int) -> Tensor:
        if a.type != b.type:
            raise GGMLError(f"concat: types {a.type.name} and {b.type.name} differ")
        for i in range(4):
            if i != dim and a.ne[i] != b.ne[i]:
                raise GGMLError(f"concat along {dim}: ne={a.ne} and ne={b.ne} differ in dim {i}")
        return self._t(lib.ggml_concat(self.ctx.ptr, a.ptr, b.ptr, int(dim)))

    # -- attention ---------------------------------------------------------------------
    def flash_attn(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """q ne=[D, Lq, H, B] F32; k, v ne=[D, Lk, H, B] F32/F16 -> ne=[D, H, Lq, B] (permuted, as ggml returns it)."""
        self._f32(q, op="flash_attn")
        for t in (k, v):
            if t.type not in (GGMLType.F32, GGMLType.F16):
                raise GGMLError(f"flash_attn: K/V must be F32 or F16, got {t.type.name}")
        if q.ne[0] != k.ne[0] or k.ne[1] != v.ne[1] or q.ne[2] % k.ne[2] or k.ne[2] != v.ne[2] or q.ne[3] != k.ne[3]:
            raise GGMLError(f"flash_attn: incompatible q ne={q.ne}, k ne={k.ne}, v ne={v.ne}")
        out = self._t(lib.ggml_flash_attn_ext(self.ctx.ptr, q.ptr, k.ptr, v.ptr, None, float(scale), 0.0, 0.0))
        lib.ggml_prec_set_acc(out.ptr, GGML_PREC_F32)
        return out

    def soft_max(self, a: Tensor, scale: float) -> Tensor:
        return self._unary(lib.ggml_soft_max_ext, a, "soft_max", None, float(scale), 0.0)


class Graph(Native):
    """A compute graph built once and reused: its own context, a graph allocator reserved for it,
    and named inputs in a separate persistent buffer so values that do not change are uploaded once."""

    def __init__(self, backend: Backend, inputs: Sequence[tuple[str, GGMLType, Sequence[int]]],
                 build: Callable[[Builder, dict[str, Tensor]], dict[str, Tensor]], *, graph_size: int = 8192, measure_only: bool = False,
                 allocate: bool = True) -> None:
        """``measure_only`` (or ``allocate=False``): size the compute buffer (``compute_bytes``) without allocating it.
        A measure-only graph cannot compute (every tensor it reads must still have memory, e.g. weights aliasing
        untouched host pages); an unallocated one computes once `SharedCompute` has placed it."""
        self.backend = backend
        self.inputs = TensorStore(backend, inputs, usage_weights=False)
        self.ctx = Context(n_tensors=0, graph_size=graph_size)
        self.builder = Builder(self.ctx)
        self.outputs = build(self.builder, dict(self.inputs.tensors))
        self.graph = lib.ggml_new_graph_custom(self.ctx.ptr, graph_size, False)
        for t in self.outputs.values():
            lib.ggml_set_output(t.ptr)
            lib.ggml_build_forward_expand(self.graph, t.ptr)
        self.n_nodes = lib.ggml_graph_n_nodes(self.graph)
        self.allocr = lib.ggml_gallocr_new(backend.buffer_type)
        self.ready = not measure_only and allocate
        if not self.ready:
            size = ctypes.c_size_t(0)
            lib.ggml_gallocr_reserve_n_size(self.allocr, self.graph, None, None, ctypes.byref(size))
            self.compute_bytes = int(size.value)
            self._free("allocr", lib.ggml_gallocr_free)
            return
        if not lib.ggml_gallocr_reserve(self.allocr, self.graph) or not lib.ggml_gallocr_alloc_graph(self.allocr, self.graph):
            raise GGMLError(f"could not allocate the compute buffer on backend {backend.name}")
        self.compute_bytes = int(lib.ggml_gallocr_get_buffer_size(self.allocr, 0))

    def set(self, name: str, data: np.ndarray) -> None:
        if name not in self.inputs:
            raise GGMLError(f"graph has no input {name!r}")
        upload(self.inputs[name], data)

    def compute(self) -> None:
        if not self.ready:
            raise GGMLError("this graph has no compute buffer (measure-only, or not placed by SharedCompute)")
        status = lib.ggml_backend_graph_compute(self.backend.handle, self.graph)
        if status != 0:
            raise GGMLError(f"graph compute failed on backend {self.backend.name} (status {status})")

    def get(self, name: str) -> np.ndarray:
        return download(self.outputs[name])

    def close(self) -> None:
        self.ready = False
        self._free("allocr", lib.ggml_gallocr_free)
        self.ctx.close()
        self.inputs.close()


class SharedCompute(Native):
    """One compute buffer for graphs that run one after another and pass nothing through it (their results go to
    persistent tensors): reserved for each graph in turn, so it ends the size of the largest, then every graph is
    placed in it. It is never reallocated after that, so each graph's placement stays valid."""

    def __init__(self, backend: Backend, graphs: Sequence[Graph]) -> None:
        self.allocr = lib.ggml_gallocr_new(backend.buffer_type)
        if not all(lib.ggml_gallocr_reserve(self.allocr, g.graph) for g in graphs):
            raise GGMLError(f"could not allocate the compute buffer on backend {backend.name}")
        size = int(lib.ggml_gallocr_get_buffer_size(self.allocr, 0))
        for g in graphs:
            if not lib.ggml_gallocr_alloc_graph(self.allocr, g.graph) or int(lib.ggml_gallocr_get_buffer_size(self.allocr, 0)) != size:
                raise GGMLError(f"could not place a graph in the shared compute buffer on backend {backend.name}")
            g.ready = True
        self.graphs, self.compute_bytes = list(graphs), size

    def close(self) -> None:
        for g in self.graphs:
            g.ready = False
        self._free("allocr", lib.ggml_gallocr_free)
