"""Storage dtypes of float features (`--dtype fp16|bf16|fp8|fp32`): what goes into each
`.npy` of a sidecar tar, and how to get float values back.

Every stored value is ONE `.npy` that `np.load(..., allow_pickle=False)` reads:

| dtype | stored `.npy` | bytes / value |
|---|---|---|
| `fp32` | plain float32 array | 4 |
| `fp16` | plain float16 array (round to nearest even; beyond ±65504 becomes inf) | 2 |
| `bf16` | layout "float32" (default): plain float32 array holding bf16-rounded values | 4 |
|        | layout "bits": structured array, one field `("bf16", "<u2")` = the bf16 bit pattern | 2 |
| `fp8`  | 0-d structured array `[("scale", "<f4"), ("bits", "u1", shape)]`: OCP FP8 E4M3 (`torch.float8_e4m3fn`) bits of `x / scale`, scale = max abs / 448 | 1 (+4 per tensor) |

numpy has no bfloat16, so bf16 has two layouts. "float32" is what any tool reads as floats
with no posedata code, but it is as large as fp32: only the values are bf16. "bits" halves
the size; its named field `bf16` says what the uint16 holds, so it is never mistaken for
integer data. `decode_float` turns both into float32.

fp8 packs the per-tensor scale and the bits into a single structured `.npy` (numpy writes and
reads structured dtypes with subarray fields without pickle), so one tar member still holds
one feature output. Reading it needs no torch: `decode_float` looks the bits up in a
256-entry table built here from the E4M3 bit layout.
"""

from __future__ import annotations

import io

import numpy as np

STORAGE_DTYPES = ("fp16", "bf16", "fp8", "fp32")
BF16_LAYOUTS = ("float32", "bits")

# OCP FP8 E4M3 ("fn": finite, no inf): largest finite value 0b0_1111_110 = 1.75 * 2^8.
FP8_E4M3_MAX = 448.0
# Field names that identify the structured layouts in a stored .npy.
FP8_FIELDS = ("scale", "bits")
BF16_FIELDS = ("bf16",)


def _e4m3fn_table() -> np.ndarray:
    """float32 value of each of the 256 E4M3FN bit patterns: sign bit, 4-bit exponent with
    bias 7, 3-bit mantissa; exponent 0 is subnormal (mantissa / 8 * 2^-6); S.1111.111 is NaN
    (the format has no infinities, so exponent 15 otherwise holds normal numbers)."""
    bits = np.arange(256, dtype=np.int32)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exponent = (bits >> 3) & 0xF
    mantissa = (bits & 0x7).astype(np.float64)
    normal = (1.0 + mantissa / 8.0) * np.exp2(exponent - 7.0)
    subnormal = (mantissa / 8.0) * np.exp2(-6.0)
    table = sign * np.where(exponent == 0, subnormal, normal)
    table[(bits & 0x7F) == 0x7F] = np.nan
    return table.astype(np.float32)


FP8_E4M3_TABLE = _e4m3fn_table()


def bytes_per_value(dtype: str, bf16_layout: str = "float32") -> int:
    """Bytes each value takes in the stored .npy (fp8 adds one 4-byte scale per tensor)."""
    _check_dtype(dtype, bf16_layout)
    if dtype == "bf16":
        return 4 if bf16_layout == "float32" else 2
    return {"fp32": 4, "fp16": 2, "fp8": 1}[dtype]


def encode_float(array: np.ndarray, dtype: str, bf16_layout: str = "float32") -> np.ndarray:
    """A float array -> the array to `np.save` for storage dtype `dtype` (see the module doc).

    Values go through float32 first (features are computed in fp32 or rounded from fp16/bf16,
    so this loses nothing). bf16 and fp8 are rounded by torch's own casts (round to nearest
    even), the same ones the extractors use, so torch is imported for those two.
    """
    _check_dtype(dtype, bf16_layout)
    values = np.asarray(array, dtype=np.float32)
    if dtype == "fp32":
        return values
    if dtype == "fp16":
        return values.astype(np.float16)
    if dtype == "bf16":
        bits = _bf16_bits(values)
        if bf16_layout == "bits":
            return bits.astype("<u2", copy=False).view(np.dtype([(BF16_FIELDS[0], "<u2")]))
        return _bf16_bits_to_float32(bits)
    return _encode_fp8(values)


def decode_float(stored: np.ndarray) -> np.ndarray:
    """What `np.load` returned -> float values: float32 for the fp8 and bf16-bits layouts,
    any plain array unchanged (fp16 stays float16)."""
    if is_fp8(stored):
        scale = np.float32(stored["scale"])
        return np.asarray(FP8_E4M3_TABLE[np.asarray(stored["bits"])] * scale)
    if is_bf16_bits(stored):
        return _bf16_bits_to_float32(np.asarray(stored[BF16_FIELDS[0]]))
    return stored


def is_fp8(stored: np.ndarray) -> bool:
    return isinstance(stored, np.ndarray) and stored.dtype.names == FP8_FIELDS


def is_bf16_bits(stored: np.ndarray) -> bool:
    return isinstance(stored, np.ndarray) and stored.dtype.names == BF16_FIELDS


def stored_nbytes(shape: tuple[int, ...], dtype: str, bf16_layout: str = "float32") -> int:
    """Size of the .npy file `np.save(encode_float(x, dtype))` writes for an x of `shape`,
    computed from the shape alone: the exact npy header plus the values."""
    stored_dtype, stored_shape = stored_layout(shape, dtype, bf16_layout)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header,
        {"descr": np.lib.format.dtype_to_descr(stored_dtype), "fortran_order": False, "shape": stored_shape},
    )
    # np.save writes format 2.0 (4-byte length) only for headers over 64 KiB: never here.
    return len(header.getvalue()) + stored_dtype.itemsize * int(np.prod(stored_shape, dtype=np.int64))


def stored_layout(shape: tuple[int, ...], dtype: str, bf16_layout: str = "float32") -> tuple[np.dtype, tuple[int, ...]]:
    """(numpy dtype, array shape) of the stored .npy for a feature of `shape`."""
    _check_dtype(dtype, bf16_layout)
    shape = tuple(int(s) for s in shape)
    if dtype == "fp8":
        return _fp8_dtype(shape), ()
    if dtype == "bf16" and bf16_layout == "bits":
        return np.dtype([(BF16_FIELDS[0], "<u2")]), shape
    return np.dtype({"fp32": np.float32, "fp16": np.float16, "bf16": np.float32}[dtype]), shape


# ---- internals ------------------------------------------------------------------------------


def _check_dtype(dtype: str, bf16_layout: str) -> None:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    if bf16_layout not in BF16_LAYOUTS:
        raise ValueError(f"bf16_layout must be one of {BF16_LAYOUTS}, got {bf16_layout!r}")


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bf16 bit patterns, rounded by torch (nearest even, NaN kept NaN)."""
    import torch

    # (not np.ascontiguousarray: it turns a 0-d array into a 1-d one)
    tensor = torch.from_numpy(np.asarray(values, order="C"))
    return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    # bf16 is the top half of a float32: widening is exact. (In place, so a 0-d array stays
    # an array instead of becoming a numpy scalar.)
    widened = np.array(bits, dtype=np.uint32)
    widened <<= 16
    return widened.view(np.float32)


def _fp8_dtype(shape: tuple[int, ...]) -> np.dtype:
    return np.dtype([(FP8_FIELDS[0], "<f4"), (FP8_FIELDS[1], "u1", shape)])


def _encode_fp8(values: np.ndarray) -> np.ndarray:
    import torch

    if not np.isfinite(values).all():
        # A per-tensor scale cannot represent inf, and a NaN would poison the scale.
        raise ValueError("fp8 storage needs finite values (got inf or NaN)")
    amax = float(np.abs(values).max()) if values.size else 0.0
    if amax == 0.0:
        scale = np.float32(1.0)
    else:
        # Never 0: amax / 448 underflows float32 for amax < 3e-43 (zeros in practice).
        scale = np.float32(max(amax / FP8_E4M3_MAX, float(np.finfo(np.float32).smallest_subnormal)))
    # float32 division can land a hair above 448. torch 2.14 saturates out-of-range values,
    # but older releases cast anything >= 480 to NaN (0x7F): clamp so neither matters.
    scaled = np.asarray(np.clip(values / scale, -FP8_E4M3_MAX, FP8_E4M3_MAX), dtype=np.float32, order="C")
    bits = torch.from_numpy(scaled).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    stored = np.zeros((), dtype=_fp8_dtype(values.shape))
    stored["scale"] = scale
    stored["bits"] = bits
    return stored
