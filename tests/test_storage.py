import io

import numpy as np
import pytest
import torch

from posedata.storage import (
    BF16_LAYOUTS,
    FP8_E4M3_MAX,
    FP8_E4M3_TABLE,
    STORAGE_DTYPES,
    bytes_per_value,
    decode_float,
    encode_float,
    is_bf16_bits,
    is_fp8,
    stored_nbytes,
)

# E4M3 keeps 3 mantissa bits: round to nearest is off by at most half an ulp, 2^-4 relative.
# Below the smallest normal (2^-6, after scaling) the ulp is fixed at 2^-9.
FP8_MAX_RELATIVE_ERROR = 2.0**-4
FP8_MIN_NORMAL = 2.0**-6
FP8_SUBNORMAL_HALF_ULP = 2.0**-10
# float32 rounding of x / scale and of table value * scale.
FLOAT32_SLACK = 1e-6


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npy_round_trip(array: np.ndarray) -> np.ndarray:
    return np.load(io.BytesIO(npy_bytes(array)), allow_pickle=False)


def assert_fp8_error_bounds(x: np.ndarray, stored: np.ndarray) -> None:
    decoded = decode_float(stored)
    scale = float(stored["scale"])
    error = np.abs(decoded.astype(np.float64) - x)
    magnitude = np.abs(x.astype(np.float64))
    normal = magnitude / scale >= FP8_MIN_NORMAL
    bound = np.where(normal, FP8_MAX_RELATIVE_ERROR * magnitude, FP8_SUBNORMAL_HALF_ULP * scale)
    assert np.all(error <= bound * (1 + FLOAT32_SLACK) + FLOAT32_SLACK * magnitude)


def test_fp8_table_matches_torch_for_every_bit_pattern():
    expected = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(FP8_E4M3_TABLE), nan)
    assert np.flatnonzero(nan).tolist() == [0x7F, 0xFF]
    assert FP8_E4M3_TABLE.dtype == np.float32
    assert np.array_equal(FP8_E4M3_TABLE[~nan], expected[~nan])
    # -0.0 keeps its sign, as torch's does.
    assert np.array_equal(np.signbit(FP8_E4M3_TABLE[~nan]), np.signbit(expected[~nan]))
    assert np.nanmax(FP8_E4M3_TABLE) == FP8_E4M3_MAX


def test_fp8_round_trip_error_bounds_and_cosine():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(64, 1024)).astype(np.float32)
    for x in vectors:
        stored = encode_float(x, "fp8")
        assert_fp8_error_bounds(x, stored)
        decoded = decode_float(stored)
        cosine = float(decoded @ x / (np.linalg.norm(decoded) * np.linalg.norm(x)))
        assert cosine > 0.999
        # The largest magnitude maps to exactly ±448 * scale.
        assert np.max(np.abs(decoded)) == pytest.approx(np.max(np.abs(x)), rel=1e-6)


def test_fp8_heavy_tailed_tensor_stays_within_bounds():
    rng = np.random.default_rng(1)
    tokens = rng.normal(0.0, 2.0, size=(257, 1536)).astype(np.float32)
    tokens[:, [7, 300, 1100]] = rng.choice([-1.0, 1.0], size=(257, 3)) * rng.uniform(50, 100, size=(257, 3))
    assert_fp8_error_bounds(tokens, encode_float(tokens, "fp8"))


def test_fp8_zeros():
    stored = encode_float(np.zeros((4, 8, 8), dtype=np.float32), "fp8")
    assert float(stored["scale"]) == 1.0
    assert not stored["bits"].any()
    decoded = decode_float(stored)
    assert decoded.shape == (4, 8, 8) and decoded.dtype == np.float32 and not decoded.any()


@pytest.mark.parametrize("magnitude", [3e38, 1e20, 1e-20, 1e-37])
def test_fp8_huge_and_tiny_magnitudes(magnitude):
    rng = np.random.default_rng(2)
    x = (rng.normal(size=512) * magnitude / 4).astype(np.float32)
    x[0] = magnitude  # the extreme value itself must survive the scale
    stored = encode_float(x, "fp8")
    decoded = decode_float(stored)
    assert np.isfinite(decoded).all()
    assert_fp8_error_bounds(x, stored)


def test_fp8_float32_subnormal_input_stays_finite_and_close():
    # Scales this small are themselves float32 subnormals with few significant bits.
    x = np.array([1e-40, -5e-41, 0.0], dtype=np.float32)
    decoded = decode_float(encode_float(x, "fp8"))
    assert np.isfinite(decoded).all()
    assert np.allclose(decoded, x, rtol=0.1, atol=0)


def test_fp8_never_produces_nan_at_the_clamp():
    # Many maxima: x / (amax / 448) rounds above 448 for some of them; clamping keeps them finite.
    rng = np.random.default_rng(3)
    for amax in rng.uniform(1e-3, 1e3, size=2000).astype(np.float32):
        x = np.array([amax, -amax, amax / 3], dtype=np.float32)
        decoded = decode_float(encode_float(x, "fp8"))
        assert not np.isnan(decoded).any()
        assert decoded[0] == pytest.approx(float(amax), rel=1e-6)


def test_fp8_rejects_non_finite_input():
    for bad in (np.inf, -np.inf, np.nan):
        with pytest.raises(ValueError, match="finite"):
            encode_float(np.array([1.0, bad], dtype=np.float32), "fp8")


def test_fp8_file_is_half_of_fp16():
    x = np.random.default_rng(4).normal(size=(257, 1536)).astype(np.float32)
    fp8 = len(npy_bytes(encode_float(x, "fp8")))
    fp16 = len(npy_bytes(encode_float(x, "fp16")))
    assert 0.49 < fp8 / fp16 < 0.51


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("bf16_layout", BF16_LAYOUTS)
def test_stored_npy_loads_without_pickle_and_decodes(dtype, bf16_layout):
    x = np.random.default_rng(5).normal(size=(4, 16, 11)).astype(np.float32)
    stored = encode_float(x, dtype, bf16_layout=bf16_layout)
    data = npy_bytes(stored)
    loaded = np.load(io.BytesIO(data), allow_pickle=False)
    assert loaded.dtype == stored.dtype and loaded.shape == stored.shape
    decoded = decode_float(loaded)
    assert decoded.shape == x.shape
    assert np.array_equal(decoded, decode_float(stored))
    assert np.allclose(decoded, x, rtol=2.0**-4, atol=1e-3)
    assert len(data) == stored_nbytes(x.shape, dtype, bf16_layout)


def test_layouts_are_recognised():
    x = np.ones((3, 2), dtype=np.float32)
    assert is_fp8(encode_float(x, "fp8")) and not is_bf16_bits(encode_float(x, "fp8"))
    assert is_bf16_bits(encode_float(x, "bf16", bf16_layout="bits"))
    for dtype in ("fp16", "fp32"):
        stored = encode_float(x, dtype)
        assert not is_fp8(stored) and not is_bf16_bits(stored)
        assert decode_float(stored) is stored  # plain arrays come back unchanged
    assert encode_float(x, "fp16").dtype == np.float16
    assert encode_float(x, "bf16").dtype == np.float32


def test_bf16_layouts_hold_torch_rounded_values():
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.normal(size=1000) * 10, [0.0, -0.0, 1e-40, 3e38, np.inf, -np.inf]]).astype(np.float32)
    expected = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    as_float32 = encode_float(x, "bf16")
    as_bits = encode_float(x, "bf16", bf16_layout="bits")
    assert np.array_equal(as_float32, expected)
    assert np.array_equal(decode_float(npy_round_trip(as_bits)), expected)
    assert np.isnan(decode_float(encode_float(np.array([np.nan], dtype=np.float32), "bf16", "bits"))).all()
    assert as_bits.nbytes * 2 == as_float32.nbytes


def test_scalar_and_empty_arrays_keep_their_shape():
    for x in (np.float32(3.0), np.zeros((0,), np.float32), np.zeros((2, 0), np.float32)):
        for dtype in STORAGE_DTYPES:
            for layout in BF16_LAYOUTS:
                stored = encode_float(x, dtype, bf16_layout=layout)
                decoded = decode_float(npy_round_trip(stored))
                assert isinstance(stored, np.ndarray) and isinstance(decoded, np.ndarray)
                assert decoded.shape == np.shape(x)
                assert np.array_equal(decoded.astype(np.float32), np.asarray(x))


def test_bytes_per_value_and_bad_names():
    assert [bytes_per_value(d) for d in STORAGE_DTYPES] == [2, 4, 1, 4]
    assert bytes_per_value("bf16", bf16_layout="bits") == 2
    with pytest.raises(ValueError, match="storage dtype"):
        encode_float(np.ones(2), "int8")
    with pytest.raises(ValueError, match="bf16_layout"):
        bytes_per_value("bf16", bf16_layout="packed")


# ---- format 2: plain-numeric members ---------------------------------------------------------

from posedata.storage import (  # noqa: E402
    BF16_DECODE,
    FP8_DECODE,
    card_output,
    decode_output_members,
    encode_members,
    member_nbytes,
    output_members,
    output_names,
)


def one_liner(code: str, **arrays) -> np.ndarray:
    """Run a documented decode as a user would: numpy only, the members' arrays by name."""
    names = {"np": np, **arrays}
    exec(code, names)
    return names["x"]


def test_fp8_members_are_plain_numbers_and_the_one_liner_decodes_them_exactly():
    x = np.random.default_rng(3).normal(size=(4, 8, 6)).astype(np.float32) * 7
    members = {m: npy_round_trip(a) for m, a in encode_members("mean.npy", x, "float8_e4m3fn").items()}
    assert {m: (a.dtype, a.shape) for m, a in members.items()} == {"mean.e4m3.npy": (np.uint8, (4, 8, 6)), "mean.scale.npy": (np.float32, (1,))}
    decoded = decode_output_members("mean.npy", members)
    assert decoded.dtype == np.float32
    # the same bits and scale as format 1's packed array, so the same values
    assert np.array_equal(decoded, decode_float(encode_float(x, "fp8")))
    assert np.array_equal(one_liner(FP8_DECODE, bits=members["mean.e4m3.npy"], scale=members["mean.scale.npy"]), decoded)
    # every bit pattern but NaN (never written), sign of zero included
    bits = np.arange(256, dtype=np.uint8)[(np.arange(256) & 0x7F) != 0x7F]
    by_hand = one_liner(FP8_DECODE, bits=bits, scale=np.ones(1, dtype=np.float32))
    assert np.array_equal(by_hand, FP8_E4M3_TABLE[bits]) and np.array_equal(np.signbit(by_hand), np.signbit(FP8_E4M3_TABLE[bits]))
    # tools that widen the bits (HF datasets' numpy format gives int64) decode the same
    assert np.array_equal(one_liner(FP8_DECODE, bits=members["mean.e4m3.npy"].astype(np.int64), scale=members["mean.scale.npy"].astype(np.float64)), decoded)


def test_bf16_member_is_uint16_bits_and_the_one_liner_decodes_it():
    x = np.random.default_rng(4).normal(size=(257, 16)).astype(np.float32)
    (name, bits), = encode_members("tokens.npy", x, "bfloat16").items()
    assert name == "tokens.bf16.npy" and bits.dtype == np.uint16
    expected = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert np.array_equal(decode_output_members("tokens.npy", {name: npy_round_trip(bits)}), expected)
    assert np.array_equal(one_liner(BF16_DECODE, bits=bits), expected)


def test_outputs_are_found_by_member_name_whatever_the_dtype():
    present = ["embeds.e4m3.npy", "embeds.scale.npy", "tokens.bf16.npy", "keypoints.npy", "skeleton.png"]
    assert output_members("embeds.npy", present) == ["embeds.e4m3.npy", "embeds.scale.npy"]
    assert output_members("tokens.npy", present) == ["tokens.bf16.npy"]
    assert output_members("keypoints.npy", present) == ["keypoints.npy"]
    assert output_members("mean.npy", present) is None
    assert output_names(present) == ["embeds.npy", "tokens.npy", "keypoints.npy", "skeleton.png"]
    with pytest.raises(ValueError, match="embeds.scale.npy"):
        decode_output_members("embeds.npy", {"embeds.e4m3.npy": np.zeros(4, dtype=np.uint8)})


def test_the_card_lists_the_members_with_their_real_dtypes():
    assert card_output("keypoints.npy", "float32", (18, 3)) == {"dtype": "float32", "shape": [18, 3], "description": ""}
    entry = card_output("embeds.npy", "float8_e4m3fn", (1024,), "CLIP")
    assert entry["dtype"] == "float32" and entry["precision"] == "float8_e4m3fn" and entry["decode"] == FP8_DECODE
    assert {m: d["dtype"] for m, d in entry["members"].items()} == {"embeds.e4m3.npy": "uint8", "embeds.scale.npy": "float32"}
    assert {m: d["dtype"] for m, d in card_output("embeds.npy", "bfloat16", (1024,))["members"].items()} == {"embeds.bf16.npy": "uint16"}


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_member_sizes_from_the_shape_equal_np_save(dtype):
    from posedata.extractors.base import numpy_store_dtype, stored_dtype_label

    x = np.ones((4, 8, 6), dtype=numpy_store_dtype(dtype))
    saved = [len(npy_bytes(a)) for a in encode_members("mean.npy", x, stored_dtype_label(dtype)).values()]
    assert saved == member_nbytes(x.shape, dtype)
