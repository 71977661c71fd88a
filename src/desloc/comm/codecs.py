"""Wire codecs: how a worker's float32 sync message is packed into bytes (issue 20). Pure tensor math.

The algorithm computes a per-worker float32 message ``delta``, sends ``payload = codec.encode(delta)``
(all-gathered, one uint8 row per worker), keeps the error ``delta - codec.decode(payload, n)`` for
error feedback, and every worker decodes all M rows and averages them.

Rules every codec keeps
    * ``encode(x)``: ``x`` is ``[..., n]`` (1-D for one worker, ``[M, n]`` in the simulator: one row
      per worker), float32 (float64 / bf16 / fp16 are cast to float32 first). Returns a new,
      contiguous uint8 tensor ``[..., nbytes(n)]``. ``decode(payload, n)``: uint8 ``[..., nbytes(n)]``
      -> a new contiguous float32 ``[..., n]`` (never a view of ``payload``).
    * **Rows are independent, bit for bit**: ``encode(x)[m] == encode(x[m])`` and
      ``decode(p)[m] == decode(p[m])`` exactly, since the simulator encodes ``[M, n]`` and a
      torch.distributed worker encodes ``[n]``. Every step is elementwise or a per-block max (exact in
      any order); top-k breaks ties by index explicitly. Deterministic for the same input.
    * Byte order is the machine's (little-endian on every platform torch supports); payloads are wire
      data between workers of one run, not a file format.
    * ``nbytes(n)`` is the exact payload size of one worker (one row).

Formats (``B = BLOCK = 64`` elements per scale block; ``nb = ceil(n / B)``; the last block is padded
with zeros, which changes no block maximum; the pad is never sent)

=============  =========================================================  =========================
name           wire (one row)                                             nbytes(n)
=============  =========================================================  =========================
``none``       the float32 values                                         ``4 n``
``bf16``       bfloat16 values (round to nearest even)                    ``2 n``
``fp16``       float16 values (round to nearest even), saturated          ``2 n``
``int8``       n int8 codes, then nb float32 scales                       ``n + 4 nb``
``int4``       ceil(n/2) bytes of 4-bit codes, then nb float32 scales     ``ceil(n/2) + 4 nb``
``fp8``        n float8_e4m3fn codes, then nb float32 scales              ``n + 4 nb``
``topk:F``     k float32 values, then their k int32 indices (ascending)   ``8 k``
=============  =========================================================  =========================

Update rules and error bounds (per element; "up to float32 rounding" means the bound may be exceeded
by a few float32 ulps of the block's absmax, from the division by and multiplication with the scale)

``none``
    Exact (``lossless``).
``bf16``
    ``dec = float(bf16(x))``: relative error ``<= 2^-8`` (half an ulp of an 8-bit significand) for
    normal values; non-finite values pass through.
``fp16``
    ``dec = float(fp16(clamp(x, -65504, 65504)))``: values beyond the fp16 range **saturate** to
    +-65504 (including +-inf; NaN stays NaN). Relative error ``<= 2^-11`` for ``2^-14 <= |x| <= 65504``;
    absolute ``<= 2^-25`` below (fp16 subnormals); unbounded for saturated values.
``int8``
    Per block: ``scale = absmax / 127`` (float32; a block of zeros has scale 0 and decodes to zeros),
    ``q = clamp(round_half_even(x / scale), -127, 127)``, ``dec = q * scale``.
    ``|x - dec| <= scale / 2`` up to float32 rounding.
``int4``
    Same with ``scale = absmax / 7`` and levels ``[-7, 7]``: ``|x - dec| <= absmax / 7 / 2``.
    Packing: code ``c = q + 8`` (offset binary, 1..15; 8 is zero), element ``2i`` in the **low**
    nibble and ``2i + 1`` in the **high** nibble of byte ``i``; an odd n leaves the last high nibble 8.
``fp8``
    Per block: ``scale = absmax / 448``, ``y = clamp(x / scale, -448, 448)`` cast to float8 e4m3
    (``torch.float8_e4m3fn``, round to nearest even), ``dec = float(y) * scale``. Relative error
    ``<= 2^-4`` of the scaled value (3 mantissa bits) for ``|y| >= 2^-6``; absolute ``<= 2^-10 * scale``
    below (e4m3 subnormals). A block of zeros decodes to zeros.
``topk:F`` (``0 < F <= 1``)
    ``k = min(n, max(1, ceil(F n)))`` (F taken as the exact decimal written); keeps the k elements of
    largest ``|x|`` in each row, ties broken by the smaller index (NaN counts as largest), sent as
    (values, indices) in ascending index order. Decode scatters them into zeros: exact on the kept
    elements, the rest are lost (decode to 0).

Non-finite input: a block (int8 / int4 / fp8) holding inf or NaN has a non-finite scale and decodes to
non-finite values, so a divergence is not hidden; its code bytes are deterministic but meaningless.
Subnormal block maxima (``absmax < 127 * 2^-126`` for int8) lose scale precision; the codes are
clamped, so they stay within the levels.

Specs (``--compression``): :func:`parse_compression` reads ``"int8"`` (every tag),
``"params=int4,exp_avg=int8"`` (per tag) or ``"int8,params=int4"`` (default ``"*"`` plus overrides);
:func:`codec_for` gives the codec of one tag (``None`` when uncompressed).
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from fractions import Fraction

import torch

from desloc.errors import ConfigError

__all__ = [
    "BLOCK",
    "CODECS",
    "Codec",
    "codec_for",
    "format_compression",
    "get_codec",
    "parse_compression",
]

BLOCK = 64  # elements per scale block for int8 / int4 / fp8
CODECS: tuple[str, ...] = ("none", "bf16", "fp16", "int8", "int4", "fp8", "topk:FRACTION")
_FP16_MAX = 65504.0
_FP8_MAX = 448.0
_FP8_TABLE = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


class Codec(ABC):
    """One wire format. Stateless; see the module docstring for the formats and bounds."""

    name: str
    lossless: bool = False

    @abstractmethod
    def nbytes(self, n: int) -> int:
        """Exact bytes of one worker's (one row's) payload for ``n`` elements."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """float ``[..., n]`` -> new contiguous uint8 ``[..., nbytes(n)]``; rows independent."""

    @abstractmethod
    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        """uint8 ``[..., nbytes(n)]`` -> new contiguous float32 ``[..., n]``; rows independent."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


# ---------------------------------------------------------------------------- shape helpers


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """float32 ``[R, n]`` (a view where possible) and the leading shape."""
    if x.dim() == 0:
        raise ValueError("codec encode needs a tensor [..., n], got a 0-d tensor")
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    if not x2.is_contiguous() or x2.stride(-1) != 1:  # size-1 dims may be "contiguous" with odd strides
        x2 = x2.clone(memory_format=torch.contiguous_format)
    return x2, lead


def _payload_rows(payload: torch.Tensor, nbytes: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    if payload.dtype != torch.uint8:
        raise ValueError(f"codec decode needs a uint8 payload, got {payload.dtype}")
    if payload.dim() == 0 or payload.shape[-1] != nbytes:
        raise ValueError(f"codec decode: payload last dim must be {nbytes} bytes, got shape {tuple(payload.shape)}")
    lead = tuple(payload.shape[:-1])
    return payload.reshape(math.prod(lead), nbytes), lead


def _as_float32(b: torch.Tensor) -> torch.Tensor:
    """Bytes ``[R, 4 m]`` (any strides or offset) -> a new float32 ``[R, m]`` (a copy: aligned, offset 0)."""
    return b.clone(memory_format=torch.contiguous_format).view(torch.float32)


def _blockwise(op, a: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> None:
    """``out = op(a, scale of the element's block)`` for ``a``, ``out``: ``[R, n]``, ``s``: ``[R, nb]``.

    No padding copies: the full blocks are viewed as ``[R, nf, B]``, the tail block separately.
    """
    r, n = a.shape
    nf = n // BLOCK
    if nf:
        full = nf * BLOCK
        op(a[:, :full].view(r, nf, BLOCK), s[:, :nf, None], out=out[:, :full].view(r, nf, BLOCK))
    if n > nf * BLOCK:
        op(a[:, nf * BLOCK :], s[:, nf : nf + 1], out=out[:, nf * BLOCK :])


def _absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-block max |x| of ``[R, n]`` -> ``[R, nb]`` (the tail block as if padded with zeros)."""
    r, n = x.shape
    nf = n // BLOCK
    # abs() first: max(amax, -amin) could give -0.0 for a zero block depending on the kernel's path,
    # i.e. different scale bytes for the same row; |x| makes every zero +0.0 (amax is NaN-propagating)
    parts = []
    if nf:
        parts.append(x[:, : nf * BLOCK].view(r, nf, BLOCK).abs().amax(dim=-1))
    if n > nf * BLOCK:
        parts.append(x[:, nf * BLOCK :].abs().amax(dim=-1, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _scaled(x: torch.Tensor, levels: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x / scale, scale)`` with ``scale = absmax / levels`` per block (scale 0 -> divide by 1)."""
    scale = _absmax(x) / levels
    safe = torch.where(scale > 0, scale, torch.ones((), dtype=scale.dtype))
    y = torch.empty_like(x)
    _blockwise(torch.div, x, safe, y)
    return y, scale


def _quantize(x: torch.Tensor, levels: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (as float32, in ``[-levels, levels]``, NaN -> 0) and the per-block scales."""
    y, scale = _scaled(x, levels)
    y.round_().clamp_(-levels, levels).nan_to_num_(0.0)
    return y, scale


# ---------------------------------------------------------------------------- codecs


class _NoneCodec(Codec):
    name = "none"
    lossless = True

    def nbytes(self, n: int) -> int:
        return 4 * n

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _rows(x)
        return x2.clone(memory_format=torch.contiguous_format).view(torch.uint8).reshape(*lead, self.nbytes(x2.shape[1]))

    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        p, lead = _payload_rows(payload, self.nbytes(n))
        return p.clone(memory_format=torch.contiguous_format).view(torch.float32).reshape(*lead, n)


class _CastCodec(Codec):
    def __init__(self, name: str, dtype: torch.dtype, clamp: float | None):
        self.name = name
        self._dtype = dtype
        self._clamp = clamp

    def nbytes(self, n: int) -> int:
        return 2 * n

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _rows(x)
        if self._clamp is not None:
            x2 = x2.clamp(-self._clamp, self._clamp)  # NaN stays NaN
        out = x2.to(self._dtype, memory_format=torch.contiguous_format).view(torch.uint8)
        return out.reshape(*lead, self.nbytes(x2.shape[1]))

    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        p, lead = _payload_rows(payload, self.nbytes(n))
        return p.clone(memory_format=torch.contiguous_format).view(self._dtype).to(torch.float32).reshape(*lead, n)


class _Int8Codec(Codec):
    name = "int8"

    def nbytes(self, n: int) -> int:
        return n + 4 * math.ceil(n / BLOCK)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _rows(x)
        r, n = x2.shape
        q, scale = _quantize(x2, 127.0)
        out = torch.empty(r, self.nbytes(n), dtype=torch.uint8)
        out[:, :n].view(torch.int8).copy_(q)
        out[:, n:].copy_(scale.view(torch.uint8))
        return out.reshape(*lead, out.shape[1])

    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        p, lead = _payload_rows(payload, self.nbytes(n))
        scale = _as_float32(p[:, n:])
        out = torch.empty(p.shape[0], n, dtype=torch.float32)
        _blockwise(torch.mul, p[:, :n].view(torch.int8), scale, out)
        return out.reshape(*lead, n)


class _Int4Codec(Codec):
    name = "int4"

    def nbytes(self, n: int) -> int:
        return (n + 1) // 2 + 4 * math.ceil(n / BLOCK)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _rows(x)
        r, n = x2.shape
        h = (n + 1) // 2
        q, scale = _quantize(x2, 7.0)
        codes = torch.full((r, 2 * h), 8, dtype=torch.uint8)
        codes[:, :n].copy_(q.add_(8.0))  # offset binary 1..15, exact in float32
        pairs = codes.view(r, h, 2)
        out = torch.empty(r, self.nbytes(n), dtype=torch.uint8)
        torch.bitwise_or(pairs[..., 0], pairs[..., 1] << 4, out=out[:, :h])
        out[:, h:].copy_(scale.view(torch.uint8))
        return out.reshape(*lead, out.shape[1])

    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        p, lead = _payload_rows(payload, self.nbytes(n))
        r = p.shape[0]
        h = (n + 1) // 2
        b = p[:, :h]
        codes = torch.stack((b & 15, b >> 4), dim=-1).view(r, 2 * h).view(torch.int8) - 8
        scale = _as_float32(p[:, h:])
        out = torch.empty(r, n, dtype=torch.float32)
        _blockwise(torch.mul, codes[:, :n], scale, out)
        return out.reshape(*lead, n)


class _Fp8Codec(Codec):
    name = "fp8"

    def nbytes(self, n: int) -> int:
        return n + 4 * math.ceil(n / BLOCK)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _rows(x)
        r, n = x2.shape
        y, scale = _scaled(x2, _FP8_MAX)
        y.clamp_(-_FP8_MAX, _FP8_MAX)  # x / (absmax / 448) can round a hair above 448
        out = torch.empty(r, self.nbytes(n), dtype=torch.uint8)
        out[:, :n].view(torch.float8_e4m3fn).copy_(y)
        out[:, n:].copy_(scale.view(torch.uint8))
        return out.reshape(*lead, out.shape[1])

    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        p, lead = _payload_rows(payload, self.nbytes(n))
        scale = _as_float32(p[:, n:])
        # the 256-entry table is the cast of every code (bit-identical, NaN codes included), and 6x
        # faster than torch's elementwise float8 -> float32 cast on CPU
        out = _FP8_TABLE.index_select(0, p[:, :n].reshape(-1).to(torch.int32)).view(p.shape[0], n)
        _blockwise(torch.mul, out, scale, out)
        return out.reshape(*lead, n)


class _TopKCodec(Codec):
    def __init__(self, fraction: Fraction, text: str):
        self.fraction = fraction
        self.name = f"topk:{text}"

    def k(self, n: int) -> int:
        """Elements kept per row: ``min(n, max(1, ceil(F n)))``, exact in the decimal F."""
        return min(n, max(1, math.ceil(self.fraction * n)))

    def nbytes(self, n: int) -> int:
        return 8 * self.k(n)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _rows(x)
        r, n = x2.shape
        k = self.k(n)
        out = torch.empty(r, 8 * k, dtype=torch.uint8)
        if k and r:
            if k == n:
                idx = torch.arange(n, dtype=torch.int64).expand(r, n)
            else:
                # the k-th largest |x| is the same whatever the tie order; then take every element
                # above it and the first (by index) of those equal to it: row-independent, exact
                a = torch.nan_to_num(x2.abs(), nan=math.inf, posinf=math.inf)
                kth = torch.kthvalue(a, n - k + 1, dim=1, keepdim=True).values
                above = a > kth
                equal = a == kth
                need = k - above.sum(dim=1, keepdim=True)
                keep = above | (equal & (equal.cumsum(dim=1) <= need))
                idx = keep.nonzero()[:, 1].view(r, k)  # row-major: ascending per row, k per row
            out[:, : 4 * k].view(torch.float32).copy_(torch.gather(x2, 1, idx))
            out[:, 4 * k :].view(torch.int32).copy_(idx)
        return out.reshape(*lead, 8 * k)

    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        k = self.k(n)
        p, lead = _payload_rows(payload, 8 * k)
        vals = _as_float32(p[:, : 4 * k])
        idx = p[:, 4 * k :].clone(memory_format=torch.contiguous_format).view(torch.int32).to(torch.int64)
        out = torch.zeros(p.shape[0], n, dtype=torch.float32)
        out.scatter_(1, idx, vals)
        return out.reshape(*lead, n)


# ---------------------------------------------------------------------------- names and specs

_FIXED: dict[str, Codec] = {
    "none": _NoneCodec(),
    "bf16": _CastCodec("bf16", torch.bfloat16, None),
    "fp16": _CastCodec("fp16", torch.float16, _FP16_MAX),
    "int8": _Int8Codec(),
    "int4": _Int4Codec(),
    "fp8": _Fp8Codec(),
}
_CHOICES = "none, bf16, fp16, int8, int4, fp8, topk:FRACTION (0 < FRACTION <= 1, e.g. topk:0.05)"


@functools.lru_cache(maxsize=None)
def get_codec(name: str) -> Codec:
    """The codec called ``name`` (case and surrounding spaces ignored); ConfigError if unknown."""
    if not isinstance(name, str):
        raise ConfigError(f"compression codec must be a string, got {name!r}; choose one of {_CHOICES}")
    key = name.strip().lower()
    if key in _FIXED:
        return _FIXED[key]
    if key.startswith("topk:"):
        text = key[5:].strip()
        try:
            f = float(text)
        except ValueError:
            f = math.nan
        if not (0.0 < f <= 1.0):
            raise ConfigError(
                f"compression codec {name!r}: the top-k fraction must be a number in (0, 1], got {text!r}; "
                "e.g. topk:0.05 keeps the 5% largest entries"
            )
        canon = repr(f)  # "0.05", "1.0", "0.001": one name per value
        return _TopKCodec(Fraction(canon), canon)
    raise ConfigError(f"unknown compression codec {name!r}; choose one of {_CHOICES}")


def parse_compression(spec: str | None, tags: list[str] | None = None) -> dict[str, str]:
    """Read a ``--compression`` spec into ``{tag: codec name}`` (``"*"``: the default for every tag).

    ``None`` / ``""`` / ``"none"`` -> ``{}`` (uncompressed); ``"int8"`` -> ``{"*": "int8"}``;
    ``"params=int4,exp_avg=int8"`` -> that dict; ``"int8,params=int4"`` -> ``{"*": "int8", "params": "int4"}``.
    Per-tag ``"none"`` is kept as written (that tag uncompressed). Codec names are validated and
    written canonically (:func:`get_codec`); with ``tags``, a tag outside it is a ConfigError.
    """
    if spec is None:
        return {}
    if not isinstance(spec, str):
        raise ConfigError(f"compression must be a string like 'int8' or 'params=int4,exp_avg=int8', got {spec!r}")
    if spec.strip().lower() in ("", "none"):
        return {}
    out: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise ConfigError(f"compression {spec!r} has an empty item; write e.g. 'int8' or 'params=int4,exp_avg=int8'")
        if "=" in item:
            tag, _, value = (s.strip() for s in item.partition("="))
            if not tag or not value:
                raise ConfigError(f"compression item {item!r} in {spec!r} needs TAG=CODEC, e.g. params=int4")
            if tag == "*":
                raise ConfigError(f"compression item {item!r} in {spec!r}: give the default codec alone, e.g. 'int8,params=int4'")
            if tags is not None and tag not in tags:
                raise ConfigError(
                    f"compression {spec!r}: unknown tag {tag!r}; this method syncs the tags {list(tags)}"
                )
        else:
            tag, value = "*", item
        if tag in out:
            what = "a default codec" if tag == "*" else f"tag {tag!r}"
            raise ConfigError(f"compression {spec!r} gives {what} twice; give each once")
        out[tag] = get_codec(value).name
    return out


def codec_for(compression: dict[str, str], tag: str) -> Codec | None:
    """The codec that ``tag`` is sent with (its own entry, else ``"*"``); ``None`` when uncompressed."""
    name = compression.get(tag, compression.get("*"))
    if name is None:
        return None
    codec = get_codec(name)
    return None if codec.name == "none" else codec


def format_compression(d: dict[str, str]) -> str:
    """Inverse of :func:`parse_compression`: ``{}`` -> ``"none"``; the default first, then ``tag=codec``."""
    if not d:
        return "none"
    parts = [d["*"]] if "*" in d else []
    parts += [f"{tag}={name}" for tag, name in d.items() if tag != "*"]
    return ",".join(parts)
