"""Wire codecs (desloc.comm.codecs): formats, byte counts, error bounds, row independence, specs.

Bounds are the module docstring's; "slack" is float32 rounding of the scale arithmetic (a few ulps
of the block absmax, here 2^-20 absmax). Bitwise comparisons are used where the arithmetic is
provably the same: row independence (elementwise ops and exact block maxima), the naive int8 /
int4 reference (same IEEE float32 division / rounding / multiplication per element), and the
hand-traced cases.
"""

from __future__ import annotations

import math

import pytest
import torch

from desloc.comm.codecs import (
    BLOCK,
    CODECS,
    Codec,
    codec_for,
    format_compression,
    get_codec,
    parse_compression,
)
from desloc.errors import ConfigError

NAMES = ["none", "bf16", "fp16", "int8", "int4", "fp8", "topk:0.05", "topk:0.5", "topk:1"]
SIZES = [1, 2, 3, 63, 64, 65, 127, 128, 1000, 4097]


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def nblocks(n: int) -> int:
    return -(-n // BLOCK)


def expected_nbytes(name: str, n: int) -> int:
    if name == "none":
        return 4 * n
    if name in ("bf16", "fp16"):
        return 2 * n
    if name in ("int8", "fp8"):
        return n + 4 * nblocks(n)
    if name == "int4":
        return (n + 1) // 2 + 4 * nblocks(n)
    f = float(name.split(":")[1])
    return 8 * min(n, max(1, math.ceil(round(f * n, 9))))


def block_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-element absmax of its block (naive: pad with zeros, loop-free reference)."""
    n = x.shape[-1]
    pad = torch.zeros(nblocks(n) * BLOCK)
    pad[:n] = x.abs()
    return pad.view(-1, BLOCK).amax(1).repeat_interleave(BLOCK)[:n]


# ------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize("name", NAMES)
def test_nbytes_formula_matches_payload(name):
    c = get_codec(name)
    for n in SIZES + [5000]:
        p = c.encode(randn(n, seed=n))
        assert p.dtype == torch.uint8 and p.is_contiguous()
        assert p.shape == (c.nbytes(n),) == (expected_nbytes(name, n),), (name, n)
        assert c.decode(p, n).shape == (n,)


def test_codec_names_and_flags():
    assert CODECS == ("none", "bf16", "fp16", "int8", "int4", "fp8", "topk:FRACTION")
    for name in ["none", "bf16", "fp16", "int8", "int4", "fp8"]:
        c = get_codec(name)
        assert isinstance(c, Codec) and c.name == name
        assert c.lossless == (name == "none")
    assert get_codec("topk:0.05").name == "topk:0.05"
    assert get_codec(" INT8 ") is get_codec("int8")
    assert get_codec("topk:0.050").name == "topk:0.05"


def test_topk_k_is_exact_decimal():
    # float 0.07 * 100 = 7.000000000000001: a float ceil would keep 8
    assert get_codec("topk:0.07").nbytes(100) == 8 * 7
    assert get_codec("topk:0.05").nbytes(10) == 8  # ceil(0.5) = 1
    assert get_codec("topk:0.001").nbytes(3) == 8  # at least one
    assert get_codec("topk:1").nbytes(5) == 40


# ------------------------------------------------------------------------------ round trips


@pytest.mark.numerics
@pytest.mark.parametrize("mag", [1e-30, 1.0, 1e30])
@pytest.mark.parametrize("name,levels", [("int8", 127.0), ("int4", 7.0)])
def test_int_round_trip_within_half_a_step(name, levels, mag):
    c = get_codec(name)
    for n in SIZES:
        x = randn(n, seed=n, scale=mag)
        x[: min(n, 5)] *= 100  # uneven blocks
        d = c.decode(c.encode(x), n)
        amax = block_absmax(x)
        bound = amax / levels / 2 + amax * 2.0**-20
        assert ((x - d).abs() <= bound).all(), (name, n, mag)


@pytest.mark.numerics
@pytest.mark.parametrize("mag", [1e-30, 1.0, 1e30])
def test_fp8_round_trip_relative_2_pow_minus_4(mag):
    c = get_codec("fp8")
    for n in SIZES:
        x = randn(n, seed=n, scale=mag)
        x[: min(n, 3)] *= 1000  # pushes the others of that block towards e4m3 subnormals
        d = c.decode(c.encode(x), n)
        amax = block_absmax(x)
        scale = amax / 448
        bound = torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10) + amax * 2.0**-20
        assert ((x - d).abs() <= bound).all(), (n, mag)


@pytest.mark.numerics
@pytest.mark.parametrize("mag", [1e-30, 1.0, 1e30])
def test_bf16_round_trip_relative_2_pow_minus_8(mag):
    c = get_codec("bf16")
    for n in SIZES:
        x = randn(n, seed=n, scale=mag)
        d = c.decode(c.encode(x), n)
        assert ((x - d).abs() <= x.abs() * 2.0**-8).all()
        assert torch.equal(d, x.to(torch.bfloat16).float())  # round to nearest even, as torch casts


@pytest.mark.numerics
def test_fp16_round_trip_relative_and_subnormal_bounds():
    c = get_codec("fp16")
    for n in SIZES:
        x = randn(n, seed=n) * 100
        d = c.decode(c.encode(x), n)
        assert ((x - d).abs() <= x.abs() * 2.0**-11).all()
        tiny = randn(n, seed=n) * 1e-6  # fp16 subnormal range
        dt = c.decode(c.encode(tiny), n)
        assert ((tiny - dt).abs() <= 2.0**-25).all()


def test_fp16_saturates():
    c = get_codec("fp16")
    x = torch.tensor([1e6, -math.inf, 70000.0, 65504.0, -1e30, math.nan, 1.5])
    d = c.decode(c.encode(x), 7)
    assert d[:5].tolist() == [65504.0, -65504.0, 65504.0, 65504.0, -65504.0]
    assert math.isnan(d[5]) and d[6] == 1.5


def test_none_is_exact_and_not_aliased():
    c = get_codec("none")
    x = randn(100) * 1e20
    p = c.encode(x)
    x += 1  # the payload does not alias the input
    d = c.decode(p, 100)
    p.zero_()  # nor does the decode alias the payload
    assert torch.equal(d, randn(100) * 1e20)


@pytest.mark.parametrize("name", NAMES)
def test_zero_block_decodes_to_zeros(name):
    c = get_codec(name)
    n = 3 * BLOCK + 5
    x = randn(n)
    x[BLOCK : 2 * BLOCK] = 0
    d = c.decode(c.encode(x), n)
    assert (d[BLOCK : 2 * BLOCK] == 0).all()
    z = torch.zeros(n)
    assert torch.equal(c.decode(c.encode(z), n), z)
    if name in ("int8", "fp8"):  # the zero block's scale is +0.0 on the wire, also for -0.0 inputs
        scales = c.encode(x)[n:].clone().view(torch.float32)
        assert scales[1] == 0 and (scales[[0, 2, 3]] > 0).all()
        assert (c.encode(-z)[n:] == 0).all()
        assert (c.encode(-z.view(1, -1).expand(3, n))[:, n:] == 0).all()


@pytest.mark.parametrize("name", ["int8", "int4", "fp8"])
def test_nonfinite_block_is_not_hidden(name):
    c = get_codec(name)
    for bad in (math.inf, math.nan):
        x = randn(2 * BLOCK)
        x[3] = bad
        d = c.decode(c.encode(x), 2 * BLOCK)
        assert not torch.isfinite(d[:BLOCK]).any()
        assert torch.isfinite(d[BLOCK:]).all()


def naive_topk(x: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest |x|, ties to the smaller index, ascending (pure Python)."""
    order = sorted(range(len(x)), key=lambda i: (-abs(float(x[i])), i))
    return sorted(order[:k])


@pytest.mark.parametrize("name", ["topk:0.05", "topk:0.3", "topk:1"])
def test_topk_keeps_the_largest_exactly(name):
    c = get_codec(name)
    for n in [1, 2, 7, 100, 333]:
        x = randn(n, seed=n)
        x[::3] = x[0]  # ties
        x[1::5] = 0
        k = c.nbytes(n) // 8
        p = c.encode(x)
        idx = p[4 * k :].clone().view(torch.int32).tolist()
        assert idx == naive_topk(x, k)
        d = c.decode(p, n)
        ref = torch.zeros(n)
        ref[idx] = x[idx]
        assert torch.equal(d, ref)


def test_topk_nan_counts_as_largest():
    c = get_codec("topk:0.5")
    d = c.decode(c.encode(torch.tensor([1.0, math.nan, -3.0, 2.0])), 4)
    assert math.isnan(d[1]) and d[2] == -3.0 and d[0] == 0 and d[3] == 0


def naive_int(x: torch.Tensor, levels: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block loop reference: codes (int) and float32 scales, the documented rule literally."""
    n = x.shape[0]
    codes, scales = [], []
    for b in range(nblocks(n)):
        blk = x[b * BLOCK : (b + 1) * BLOCK]
        s = blk.abs().max() / levels
        scales.append(s)
        q = torch.zeros_like(blk) if s == 0 else torch.round(blk / s).clamp(-levels, levels)
        codes.append(q)
    return torch.cat(codes).to(torch.int8), torch.stack(scales)


@pytest.mark.numerics
def test_int8_int4_match_naive_block_loop_bitwise():
    for n in [1, 64, 65, 200]:
        x = randn(n, seed=n) * 3
        x[: min(n, 70)][-10:] = 0
        q, s = naive_int(x, 127.0)
        p = get_codec("int8").encode(x)
        assert torch.equal(p[:n].view(torch.int8), q)
        assert torch.equal(p[n:].clone().view(torch.float32), s)
        dec = get_codec("int8").decode(p, n)
        assert torch.equal(dec, q.float() * s.repeat_interleave(BLOCK)[:n])
        q4, s4 = naive_int(x, 7.0)
        p4 = get_codec("int4").encode(x)
        h = (n + 1) // 2
        nib = torch.stack((p4[:h] & 15, p4[:h] >> 4), -1).view(-1)[:n].to(torch.int8) - 8
        assert torch.equal(nib, q4)
        assert torch.equal(p4[h:].clone().view(torch.float32), s4)


# ------------------------------------------------------------------------------ row independence


@pytest.mark.numerics
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("m", [1, 2, 3])
def test_rows_are_independent_bitwise(name, m):
    c = get_codec(name)
    for n in [1, 3, 64, 65, 1000, 2 * BLOCK * 9 + 1]:
        x = randn(m, n, seed=n + m)
        if m > 1:
            x[1] = 0  # a row of ties (topk) / zero blocks
        if m > 2:
            x[2] = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)  # all |x| equal
            x[2, n // 2 :] = 0
        p = c.encode(x)
        assert p.shape == (m, c.nbytes(n)) and p.is_contiguous()
        d = c.decode(p, n)
        assert d.shape == (m, n) and d.dtype == torch.float32 and d.is_contiguous()
        for r in range(m):
            assert torch.equal(c.encode(x[r]), p[r]), (name, n, r)
            assert torch.equal(c.encode(x[r].clone()), p[r])
            assert torch.equal(c.decode(p[r], n), d[r])
            assert torch.equal(c.decode(p[r].clone(), n), d[r])
        # more leading dims, and a non-contiguous input
        x3 = x.unsqueeze(0).expand(2, m, n)
        assert torch.equal(c.encode(x3), p.unsqueeze(0).expand(2, m, -1))
        assert torch.equal(c.decode(c.encode(x3), n), d.unsqueeze(0).expand(2, m, n))
        xt = torch.cat([x, x], dim=1)[:, ::2]  # strided view equal to x only where n is even; encode a copy
        assert torch.equal(c.encode(xt), c.encode(xt.contiguous()))


@pytest.mark.numerics
def test_topk_ties_are_row_independent_and_by_index():
    c = get_codec("topk:0.25")
    n = 40
    x = torch.zeros(3, n)
    x[1, ::3] = 1.0
    x[1, 1::3] = -1.0
    x[2, 5] = 2.0
    p = c.encode(x)
    k = 10
    for r in range(3):
        assert torch.equal(c.encode(x[r]), p[r])
    assert p[0, 4 * k :].clone().view(torch.int32).tolist() == list(range(10))  # all zero: first 10
    assert p[1, 4 * k :].clone().view(torch.int32).tolist() == [0, 1, 3, 4, 6, 7, 9, 10, 12, 13]  # ±1 at i % 3 != 2
    assert p[2, 4 * k :].clone().view(torch.int32).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_other_float_dtypes_are_cast_first():
    x = randn(3, 100)
    for name in NAMES:
        c = get_codec(name)
        assert torch.equal(c.encode(x.double()), c.encode(x))
        b = x.to(torch.bfloat16)
        assert torch.equal(c.encode(b), c.encode(b.float()))


# ------------------------------------------------------------------------------ hand traced


def test_int8_hand_traced():
    # absmax 1 -> scale = fl32(1/127); 0.5 / scale rounds (float32) to exactly 63.5, and round half to
    # even gives 64; -1 / scale = -127; 0.25 / scale = 31.75 -> 32. Wire: 3 codes + one float32 scale.
    c = get_codec("int8")
    p = c.encode(torch.tensor([0.5, -1.0, 0.25]))
    scale = torch.tensor(1.0) / 127
    assert p.shape == (7,)
    assert p[:3].view(torch.int8).tolist() == [64, -127, 32]
    assert torch.equal(p[3:].clone().view(torch.float32), scale.reshape(1))
    assert torch.equal(c.decode(p, 3), torch.tensor([64.0, -127.0, 32.0]) * scale)


def test_int4_hand_traced_bytes():
    # absmax 7 -> scale 1.0; q = [7, -7, round_half_even(2.5) = 2, -1]; codes q + 8 = [15, 1, 10, 7];
    # byte i = code[2i] | code[2i+1] << 4: 15 | 1<<4 = 0x1F, 10 | 7<<4 = 0x7A; then 1.0f = 00 00 80 3F.
    c = get_codec("int4")
    p = c.encode(torch.tensor([7.0, -7.0, 2.5, -1.0]))
    assert p.tolist() == [0x1F, 0x7A, 0x00, 0x00, 0x80, 0x3F]
    assert c.decode(p, 4).tolist() == [7.0, -7.0, 2.0, -1.0]
    # odd n: the last high nibble is the zero code 8
    p3 = c.encode(torch.tensor([7.0, -7.0, 2.5]))
    assert p3[:2].tolist() == [0x1F, 0x8A]


def test_topk_hand_traced():
    c = get_codec("topk:0.5")
    p = c.encode(torch.tensor([1.0, -3.0, 2.0, 0.0]))  # k = 2: -3 (index 1) and 2 (index 2)
    assert p.shape == (16,)
    assert p[:8].clone().view(torch.float32).tolist() == [-3.0, 2.0]
    assert p[8:].clone().view(torch.int32).tolist() == [1, 2]
    assert c.decode(p, 4).tolist() == [0.0, -3.0, 2.0, 0.0]


def test_fp8_hand_traced():
    # absmax 448 -> scale 1: the values are e4m3 codes themselves; 1 = 0x38, -448 = 0xFE, 0.3 -> 0.3125 (0x2A)
    c = get_codec("fp8")
    p = c.encode(torch.tensor([1.0, -448.0, 0.3]))
    assert p[:3].tolist() == [0x38, 0xFE, 0x2A]
    assert c.decode(p, 3).tolist() == [1.0, -448.0, 0.3125]


# ------------------------------------------------------------------------------ specs


TAGS = ["params", "exp_avg", "exp_avg_sq"]


@pytest.mark.parametrize(
    "spec,want",
    [
        (None, {}),
        ("", {}),
        ("none", {}),
        (" None ", {}),
        ("int8", {"*": "int8"}),
        ("params=int4,exp_avg=int8,exp_avg_sq=int8", {"params": "int4", "exp_avg": "int8", "exp_avg_sq": "int8"}),
        ("int8,params=int4", {"*": "int8", "params": "int4"}),
        ("params=int4, int8", {"params": "int4", "*": "int8"}),
        ("bf16,exp_avg_sq=none", {"*": "bf16", "exp_avg_sq": "none"}),
        ("params=topk:0.050", {"params": "topk:0.05"}),
        ("FP16", {"*": "fp16"}),
    ],
)
def test_parse_compression(spec, want):
    got = parse_compression(spec, TAGS)
    assert got == want
    assert parse_compression(format_compression(got), TAGS) == got


@pytest.mark.parametrize(
    "spec,words",
    [
        ("int3", ["int3", "int8", "topk:FRACTION"]),
        ("params=int3", ["int3", "choose one of"]),
        ("topk:0", ["(0, 1]", "'0'"]),
        ("topk:1.5", ["(0, 1]", "1.5"]),
        ("topk:abc", ["(0, 1]", "abc"]),
        ("topk:", ["(0, 1]"]),
        ("topk:nan", ["(0, 1]"]),
        ("grads=int8", ["'grads'", "['params', 'exp_avg', 'exp_avg_sq']"]),
        ("int8,,params=int4", ["empty item"]),
        ("params=", ["TAG=CODEC"]),
        ("=int8", ["TAG=CODEC"]),
        ("int8,fp16", ["default codec twice"]),
        ("params=int8,params=int4", ["'params' twice"]),
        ("*=int8", ["default codec alone"]),
    ],
)
def test_parse_compression_errors(spec, words):
    with pytest.raises(ConfigError) as e:
        parse_compression(spec, TAGS)
    for w in words:
        assert w in str(e.value), (spec, str(e.value))


def test_parse_without_tags_accepts_any_tag():
    assert parse_compression("grads=int8") == {"grads": "int8"}


def test_codec_for():
    d = parse_compression("int8,params=int4,exp_avg=none")
    assert codec_for(d, "params") is get_codec("int4")
    assert codec_for(d, "exp_avg") is None
    assert codec_for(d, "exp_avg_sq") is get_codec("int8")
    assert codec_for({}, "params") is None
    assert codec_for({"params": "fp8"}, "exp_avg") is None
    assert codec_for({"*": "none"}, "params") is None


def test_format_compression():
    assert format_compression({}) == "none"
    assert format_compression({"*": "int8"}) == "int8"
    assert format_compression({"params": "int4", "*": "int8"}) == "int8,params=int4"
