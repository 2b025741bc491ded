"""The TernGrad codec: unbiased ternarization, TernGrad's scaler, exact packing, the summed decode."""

import doctest
import math

import pytest
import torch

import torchslim.comm.ternary as ternary
from torchslim.comm import SCHEMES, pack, packed_numel, scaler, ternarize, unpack, unpack_sum
from torchslim.errors import ConfigError, ShapeMismatch

PER_BYTE = {"2bit": 4, "base3": 5}
BIAS_BOUND = 2.0 ** -16  # documented: |P(t ≠ 0) − p| ≤ 2^-17 plus float32 rounding


def _gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _random_codes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(-1, 2, (n,), dtype=torch.int8, generator=_gen(seed))


# --- ternarize -----------------------------------------------------------------------------------------------


def test_ternarize_is_unbiased():
    g, s = torch.tensor([0.3, -0.9, 0.0, 1.0, 0.05, -0.55, 0.999]), torch.tensor(1.0)
    draws = 20_000
    t = ternarize(g.expand(draws, -1), s, _gen()).float()  # (draws, 7): every entry an independent draw
    p = g.abs() / s
    std_err = s * torch.sqrt(p * (1 - p) / draws)  # of the mean of s·t
    torch.testing.assert_close(s * t.mean(0), g, atol=float(5 * std_err.max() + BIAS_BOUND), rtol=0)


@pytest.mark.parametrize("p", [0.3, 2.0 ** -10, 0.7 + 2.0 ** -20])
def test_keep_probability_within_documented_bias(p):
    n = 2_000_000
    t = ternarize(torch.full((n,), -p), torch.tensor(1.0), _gen(1))
    freq = (t == -1).double().mean().item()
    assert (t != -1).eq(t == 0).all()  # never the wrong sign
    assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / n) + BIAS_BOUND


def test_entries_below_half_a_level_are_never_kept():
    # |g|·2^16/s < 1/2: rounded to probability 0, the documented bias (≤ 2^-17·s)
    t = ternarize(torch.full((100_000,), 0.4 * 2.0 ** -16), torch.tensor(1.0), _gen())
    assert not t.any()


def test_codes_are_int8_ternary_with_the_input_shape():
    g = torch.randn(3, 5, 7, generator=_gen())
    t = ternarize(g, scaler(g), _gen())
    assert t.dtype == torch.int8 and t.shape == g.shape
    assert set(t.unique().tolist()) <= {-1, 0, 1}
    assert (t * torch.sign(g).to(torch.int8) >= 0).all()  # a kept code carries the sign of g


@pytest.mark.parametrize("s", [1.0, 0.3, 1e-20, 3e4])
def test_entries_at_or_beyond_s_are_clipped_to_their_sign(s):
    g = torch.tensor([s, -s, 2 * s, -7 * s, 1e6 * s]).repeat(2_000)
    for seed in range(3):
        t = ternarize(g, torch.tensor(s), _gen(seed))
        assert torch.equal(t, torch.sign(g).to(torch.int8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes(dtype):
    g = torch.tensor([0.25, -0.5, 1.0, -1.0, 0.0], dtype=dtype)
    t = ternarize(g.expand(20_000, -1), torch.tensor(1.0), _gen()).float()
    assert torch.equal(t[:, 2:], torch.tensor([1.0, -1.0, 0.0]).expand(20_000, -1))
    torch.testing.assert_close(t.mean(0)[:2], torch.tensor([0.25, -0.5]), atol=0.02, rtol=0)


def test_zero_scaler_of_a_zero_gradient_gives_zero_codes():
    g = torch.zeros(1000)
    s = scaler(g)
    assert s.item() == 0.0
    assert torch.equal(ternarize(g, s, _gen()), torch.zeros(1000, dtype=torch.int8))
    assert torch.equal(ternarize(-g, s, _gen()), torch.zeros(1000, dtype=torch.int8))  # -0.0 too


def test_non_finite_entries_give_defined_codes():
    # documented: no finiteness check; NaN → 0, ±inf → ±1 (callers send non-finite buckets uncompressed)
    g = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 2.0])
    assert ternarize(g, torch.tensor(1.0), _gen()).tolist() == [0, 1, -1, 0, 1]
    assert not ternarize(g, torch.tensor(float("inf")), _gen()).any()
    assert not ternarize(g, torch.tensor(float("nan")), _gen()).any()
    assert scaler(g).isnan()  # the scaler propagates NaN, so a finiteness check on s catches the bucket


def test_same_generator_state_same_codes_and_chunking_does_not_matter(monkeypatch):
    g = torch.randn(10_001, generator=_gen())
    s = scaler(g)
    t = ternarize(g, s, _gen(5))
    assert torch.equal(t, ternarize(g, s, _gen(5)))
    assert not torch.equal(t, ternarize(g, s, _gen(6)))
    monkeypatch.setattr(ternary, "_CPU_CHUNK", 12)  # many steps, a ragged last one
    assert torch.equal(t, ternarize(g, s, _gen(5)))


def test_given_lanes_give_the_codes_the_generator_would():
    """The two-phase hook hands ternarize pre-drawn lanes: element k reads lane k, as from the generator."""
    g = torch.randn(1003, generator=_gen(1))
    s = scaler(g)
    lanes = ternary._random_lanes(1003, _gen(5), torch.device("cpu"))
    out = torch.empty(1003, dtype=torch.int8)
    ternary._ternarize_into(g, s, out, lanes=lanes)
    assert torch.equal(out, ternarize(g, s, _gen(5)))
    assert torch.equal(ternary._random_lanes(10, _gen(5), torch.device("cpu")), lanes[:10])  # a prefix (CPU)


def test_ternarize_rejects_bad_inputs():
    with pytest.raises(ShapeMismatch, match="0-d"):
        ternarize(torch.randn(4), torch.ones(2))
    with pytest.raises(ConfigError, match="floating-point"):
        ternarize(torch.arange(4), torch.tensor(1.0))
    assert ternarize(torch.empty(0, 3), torch.tensor(1.0)).shape == (0, 3)


# --- scaler ------------------------------------------------------------------------------------------------


def test_scaler_by_hand():
    g = torch.tensor([0.0, 0, 0, 0, 0, 0, 0, -10.0])  # mean −1.25, σ² = (7·1.25² + 8.75²)/8 = 10.9375
    assert scaler(g, clip_sigma=None).item() == 10.0
    assert scaler(g, clip_sigma=math.inf).item() == 10.0
    assert scaler(g).item() == pytest.approx(2.5 * math.sqrt(10.9375), rel=1e-6)  # 8.27 < 10: clipped
    assert scaler(g, clip_sigma=1.0).item() == pytest.approx(math.sqrt(10.9375), rel=1e-6)
    assert scaler(g, clip_sigma=4.0).item() == 10.0  # 4σ = 13.2 > max|g|


def test_scaler_is_a_float32_scalar_on_the_device():
    s = scaler(torch.randn(5, 6, dtype=torch.float64))
    assert s.shape == () and s.dtype == torch.float32
    assert scaler(torch.randn(7).half()).dtype == torch.float32
    assert scaler(torch.empty(0)).item() == 0.0


@pytest.mark.parametrize("c", [0.0, -1.0, float("nan")])
def test_scaler_rejects_bad_clip_sigma(c):
    with pytest.raises(ConfigError, match="clip_sigma"):
        scaler(torch.randn(4), clip_sigma=c)


# --- pack / unpack -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n", [0, 1, 4, 5, 7, 19, 20, 21, 1001])
def test_pack_round_trip_and_size(scheme, n):
    codes = _random_codes(n, seed=n)
    packed = pack(codes, scheme)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(n / PER_BYTE[scheme]),)
    assert packed_numel(n, scheme) == packed.numel()
    out = unpack(packed, n, scheme)
    assert out.dtype == torch.int8 and torch.equal(out, codes)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_pack_round_trip_large(scheme):
    codes = _random_codes(10_000_003, seed=1)
    packed = pack(codes, scheme)
    assert packed.numel() == -(-10_000_003 // PER_BYTE[scheme])
    assert torch.equal(unpack(packed, codes.numel(), scheme), codes)


def test_pack_bytes_by_hand():
    assert pack(torch.tensor([-1, 0, 1, 1], dtype=torch.int8), "2bit").tolist() == [0 + 1 * 4 + 2 * 16 + 2 * 64]
    assert pack(torch.tensor([1], dtype=torch.int8), "2bit").tolist() == [2 + 4 + 16 + 64]  # zero padding
    assert pack(torch.tensor([1, -1, 0, 1, 0], dtype=torch.int8), "base3").tolist() == [2 + 0 + 9 + 2 * 27 + 81]
    assert pack(torch.tensor([1], dtype=torch.int8), "base3").tolist() == [2 + 3 + 9 + 27 + 81]
    assert pack(torch.ones(5, dtype=torch.int8), "base3").tolist() == [242]  # the largest byte


def test_pack_flattens_any_shape_and_integer_dtype():
    codes = _random_codes(60).view(3, 4, 5)
    for scheme in SCHEMES:
        assert torch.equal(pack(codes, scheme), pack(codes.reshape(-1), scheme))
        assert torch.equal(pack(codes.long(), scheme), pack(codes, scheme))
        assert torch.equal(pack(codes.transpose(0, 2), scheme), pack(codes.transpose(0, 2).reshape(-1), scheme))


def test_pack_and_unpack_in_chunks_match_one_step(monkeypatch):
    codes = _random_codes(1003)
    expected = {s: pack(codes, s) for s in SCHEMES}
    monkeypatch.setattr(ternary, "_PACK_CHUNK", 20)
    monkeypatch.setattr(ternary, "_SUM_BLOCK", 3)
    for scheme in SCHEMES:
        assert torch.equal(pack(codes, scheme), expected[scheme])
        assert torch.equal(unpack(expected[scheme], 1003, scheme), codes)


def test_pack_and_unpack_reject_bad_schemes_sizes_and_dtypes():
    codes = _random_codes(10)
    with pytest.raises(ConfigError, match="'2bit', 'base3'"):
        pack(codes, "3bit")
    with pytest.raises(ConfigError, match="valid schemes"):
        unpack(torch.zeros(3, dtype=torch.uint8), 10, "ternary")
    with pytest.raises(ConfigError, match="valid schemes"):
        packed_numel(10, "base4")
    with pytest.raises(ConfigError, match="numel"):
        packed_numel(-1, "2bit")
    with pytest.raises(ConfigError, match="int8"):
        pack(codes.float(), "2bit")
    with pytest.raises(ShapeMismatch, match="3 bytes"):
        unpack(torch.zeros(4, dtype=torch.uint8), 10, "2bit")
    with pytest.raises(ShapeMismatch, match="1-d"):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), 10, "2bit")
    with pytest.raises(ConfigError, match="uint8"):
        unpack(torch.zeros(3, dtype=torch.int32), 10, "2bit")


# --- unpack_sum --------------------------------------------------------------------------------------------


def _gathered(world: int, n: int, scheme: str) -> torch.Tensor:
    rows = [pack(_random_codes(n, seed=100 + i), scheme) for i in range(world)]
    return torch.stack(rows) if rows else torch.empty(0, packed_numel(n, scheme), dtype=torch.uint8)


def _reference_sum(packed: torch.Tensor, n: int, scheme: str) -> torch.Tensor:
    return sum((unpack(row, n, scheme).int() for row in packed), torch.zeros(n, dtype=torch.int32))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("world", [0, 1, 3, 130])  # 130 > 127: summed in two groups of rows
@pytest.mark.parametrize("n", [0, 1, 7, 1001])
def test_unpack_sum_equals_the_sum_of_unpacks(scheme, world, n):
    packed = _gathered(world, n, scheme)
    expected = _reference_sum(packed, n, scheme)
    total = unpack_sum(packed, n, scheme)
    assert total.dtype == torch.int32 and torch.equal(total, expected)
    assert torch.equal(unpack_sum(packed, n, scheme, torch.float32), expected.float())
    if world <= 127:
        assert torch.equal(unpack_sum(packed, n, scheme, torch.int8), expected.to(torch.int8))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_unpack_sum_into_out_and_in_blocks(scheme, monkeypatch):
    packed = _gathered(4, 1003, scheme)
    expected = _reference_sum(packed, 1003, scheme)
    out = torch.full((1003,), 123.0)
    assert unpack_sum(packed, 1003, scheme, out=out) is out
    assert torch.equal(out, expected.float())
    monkeypatch.setattr(ternary, "_SUM_BLOCK", 3)
    assert torch.equal(unpack_sum(packed, 1003, scheme), expected)


def test_unpack_sum_rejects_bad_shapes_and_dtypes():
    packed = _gathered(2, 10, "2bit")
    with pytest.raises(ShapeMismatch, match="world, nbytes"):
        unpack_sum(packed[0], 10, "2bit")
    with pytest.raises(ShapeMismatch, match="4 bytes"):
        unpack_sum(packed, 13, "2bit")
    with pytest.raises(ShapeMismatch, match="2 bytes"):
        unpack_sum(packed, 10, "base3")
    with pytest.raises(ConfigError, match="valid schemes"):
        unpack_sum(packed, 10, "1bit")
    with pytest.raises(ConfigError, match="signed integer or floating"):
        unpack_sum(packed, 10, "2bit", torch.uint8)
    with pytest.raises(ConfigError, match="int16"):
        unpack_sum(_gathered(128, 10, "2bit"), 10, "2bit", torch.int8)
    with pytest.raises(ShapeMismatch, match=r"\(10,\)"):
        unpack_sum(packed, 10, "2bit", out=torch.empty(11))
    with pytest.raises(ConfigError, match="contiguous"):
        unpack_sum(packed, 10, "2bit", out=torch.empty(10, 2)[:, 0])


# --- the whole codec, documentation, CUDA ------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_codec_average_is_unbiased(scheme):
    world, n = 8, 4_000
    g = torch.randn(world, n, generator=_gen())
    s = torch.stack([scaler(row, clip_sigma=None) for row in g]).max()  # shared scaler: MAX all-reduce
    rounds = 50
    mean = torch.zeros(n)
    for k in range(rounds):
        packed = torch.stack([pack(ternarize(row, s, _gen(1000 * k + i)), scheme) for i, row in enumerate(g)])
        mean += s * unpack_sum(packed, n, scheme, torch.float32) / world
    mean /= rounds
    err = (mean - g.mean(0)).abs()
    std_err = s / math.sqrt(world * rounds)  # bound on each entry's standard error
    assert err.max() < 6 * std_err
    assert err.mean() < 0.9 * std_err  # the typical error is well inside the bound


def test_docstring_examples():
    assert doctest.testmod(ternary, extraglobs={"torch": torch}).failed == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cuda_matches_cpu(scheme):
    g = torch.randn(100_003, generator=_gen()).cuda()
    s = scaler(g)
    assert s.is_cuda
    t = ternarize(g, s, _gen(0, "cuda"))
    assert t.is_cuda and t.dtype == torch.int8
    assert torch.equal(t[g.abs() >= s], torch.sign(g[g.abs() >= s]).to(torch.int8))
    draws = ternarize(torch.tensor([0.3, -0.6, 0.0], device="cuda").expand(20_000, -1), torch.tensor(1.0),
                      _gen(1, "cuda")).float().mean(0).cpu()
    torch.testing.assert_close(draws, torch.tensor([0.3, -0.6, 0.0]), atol=0.02, rtol=0)
    packed = pack(t, scheme)
    assert packed.is_cuda and torch.equal(packed.cpu(), pack(t.cpu(), scheme))
    assert torch.equal(unpack(packed, t.numel(), scheme).cpu(), t.cpu())
    rows = _gathered(3, 1001, scheme)
    assert torch.equal(unpack_sum(rows.cuda(), 1001, scheme).cpu(), unpack_sum(rows, 1001, scheme))
    nonfinite = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0], device="cuda")
    assert ternarize(nonfinite, torch.tensor(1.0), _gen(0, "cuda")).tolist() == [0, 1, -1, 0]
    assert not ternarize(torch.zeros(10, device="cuda"), torch.tensor(0.0, device="cuda")).any()
