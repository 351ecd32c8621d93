"""Storage dtypes of float features (`--dtype fp16|bf16|fp8|fp32`): which `.npy` members of
a sidecar tar hold one feature output, and how to get float values back.

Every member is a plain numeric `.npy` (`np.load(..., allow_pickle=False)`), so HF `datasets`,
Ray Data, wids, webdataset and numpy read it as numbers. For an output `embeds.npy`:

| dtype | members | bytes / value |
|---|---|---|
| `fp32` | `embeds.npy`: float32 | 4 |
| `fp16` | `embeds.npy`: float16 (round to nearest even; beyond ±65504 becomes inf) | 2 |
| `bf16` | `embeds.bf16.npy`: uint16, the bfloat16 bit patterns (the top half of a float32) | 2 |
| `fp8`  | `embeds.e4m3.npy`: uint8, OCP FP8 E4M3 (`torch.float8_e4m3fn`) bit patterns of `x / scale`; `embeds.scale.npy`: float32 [1], scale = max abs / 448 | 1 (+4 per tensor) |

numpy has neither bfloat16 nor fp8, so those store their bit patterns; the member names say
so (`.bf16.npy`, `.e4m3.npy`), so bits are never mistaken for integer data, and decoding
needs nothing but numpy (`BF16_DECODE`, `FP8_DECODE`: the one-liners the README and the
dataset card give). `decode_members` does the same for posedata's reader.

Format 1 datasets (posedata before the peer-tool layout) stored bf16 and fp8 as ONE structured
`.npy` under the output's own name (`[("bf16", "<u2")]`; 0-d `[("scale", "<f4"), ("bits",
"u1", shape)]`); `decode_float` still reads those, and `encode_float` still writes them for
the storage bench's round trips.
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

# What the card says an output is stored as when numpy has no such dtype (extractors declare
# these labels; posedata.extractors.base.stored_dtype_label).
BF16_LABEL, FP8_LABEL = "bfloat16", "float8_e4m3fn"
PACKED_LABELS = (BF16_LABEL, FP8_LABEL)
# Member names: <stem>.bf16.npy; <stem>.e4m3.npy + <stem>.scale.npy
BF16_TAG, FP8_TAG, SCALE_TAG = "bf16", "e4m3", "scale"

# The decodes as a user without posedata writes them: numpy only, `bits` and `scale` being the
# members' arrays. The fp8 one spells out the E4M3 layout (sign, 4-bit exponent with bias 7,
# 3-bit mantissa; exponent 0 is subnormal); the NaN pattern S.1111.111 is never written.
BF16_DECODE = "x = (bits.astype(np.uint32) << 16).view(np.float32)"
FP8_DECODE = (
    "b = bits.astype(np.int32); "
    "x = (np.where(b & 0x78, (b & 7) + 8, b & 7) * np.exp2(np.maximum(b >> 3 & 15, 1) - 10.0) * (1 - 2 * (b >> 7)) * scale).astype(np.float32)"
)


def member_suffixes(suffix: str, dtype_label: str) -> list[str]:
    """The tar members (what follows `<key>.`) that hold output `suffix` of a feature whose
    card declares it `dtype_label`."""
    stem = suffix.removesuffix(".npy")
    if dtype_label == FP8_LABEL:
        return [f"{stem}.{FP8_TAG}.npy", f"{stem}.{SCALE_TAG}.npy"]
    if dtype_label == BF16_LABEL:
        return [f"{stem}.{BF16_TAG}.npy"]
    return [suffix]


def encode_members(suffix: str, array: np.ndarray, dtype_label: str) -> dict[str, np.ndarray]:
    """Output `suffix` -> {member suffix: plain numeric array to `np.save`} (module doc)."""
    if dtype_label == FP8_LABEL:
        scale, bits = _fp8_scale_and_bits(np.asarray(array, dtype=np.float32))
        bits_name, scale_name = member_suffixes(suffix, dtype_label)
        return {bits_name: bits, scale_name: np.array([scale], dtype=np.float32)}
    if dtype_label == BF16_LABEL:
        return {member_suffixes(suffix, dtype_label)[0]: _bf16_bits(np.asarray(array, dtype=np.float32))}
    return {suffix: np.asarray(array)}


def output_members(suffix: str, present) -> list[str] | None:
    """Which members of one sample (`present`: their suffixes) hold output `suffix`, whatever
    dtype it was stored in; None if none do."""
    if suffix in present:
        return [suffix]
    if suffix.endswith(".npy"):
        for label in PACKED_LABELS:
            names = member_suffixes(suffix, label)
            if names[0] in present:
                return names
    return None


def output_names(members) -> list[str]:
    """The outputs (`embeds.npy`) that one sample's members (`embeds.e4m3.npy`,
    `embeds.scale.npy`, `skeleton.png`, ...) hold, in member order."""
    names: list[str] = []
    for member in members:
        stem, _, tag = member.removesuffix(".npy").rpartition(".")
        if member.endswith(".npy") and stem and tag in (FP8_TAG, BF16_TAG):
            name = f"{stem}.npy"
        elif member.endswith(f".{SCALE_TAG}.npy") and f"{stem}.{FP8_TAG}.npy" in members:
            continue
        else:
            name = member
        if name not in names:
            names.append(name)
    return names


def decode_output_members(suffix: str, loaded: dict[str, np.ndarray]) -> np.ndarray:
    """Output `suffix` from its loaded members (`output_members`): bf16 and fp8 bit patterns
    and format-1 packed arrays become float32; a plain array comes back unchanged."""
    stem = suffix.removesuffix(".npy")
    fp8_bits = f"{stem}.{FP8_TAG}.npy"
    if fp8_bits in loaded:
        scale_name = f"{stem}.{SCALE_TAG}.npy"
        if scale_name not in loaded:
            raise ValueError(f"{fp8_bits} has no {scale_name} beside it (the fp8 scale)")
        scale = np.float32(np.asarray(loaded[scale_name], dtype=np.float32).reshape(-1)[0])
        return FP8_E4M3_TABLE[np.asarray(loaded[fp8_bits], dtype=np.uint8)] * scale
    bf16_bits = f"{stem}.{BF16_TAG}.npy"
    if bf16_bits in loaded:
        return _bf16_bits_to_float32(np.asarray(loaded[bf16_bits], dtype=np.uint16))
    return decode_float(loaded[suffix])


def card_output(suffix: str, dtype_label: str, shape, description: str = "") -> dict:
    """The card's entry for one output. `dtype` is what a reader gets (posedata's reader, or the
    decode one-liner); outputs stored as bit patterns also list their `members` with the
    dtype each `.npy` really holds, the `precision` of the values and the `decode`."""
    entry = {"dtype": dtype_label, "shape": list(shape), "description": description}
    if dtype_label not in PACKED_LABELS:
        return entry
    names = member_suffixes(suffix, dtype_label)
    if dtype_label == FP8_LABEL:
        members = {
            names[0]: {"dtype": "uint8", "shape": list(shape), "holds": "OCP FP8 E4M3 (float8_e4m3fn) bit patterns of value / scale"},
            names[1]: {"dtype": "float32", "shape": [1], "holds": "the per-tensor scale: max abs value / 448"},
        }
    else:
        members = {names[0]: {"dtype": "uint16", "shape": list(shape), "holds": "bfloat16 bit patterns (the top 16 bits of the float32)"}}
    decode = FP8_DECODE if dtype_label == FP8_LABEL else BF16_DECODE
    return {**entry, "dtype": "float32", "precision": dtype_label, "members": members, "decode": decode}


def card_members(outputs: dict) -> list[str]:
    """Every member suffix a feature's card `outputs` stores (format 1 cards list none: each
    output is one member under its own name)."""
    return [m for suffix, entry in outputs.items() for m in (entry.get("members") or [suffix])]


def member_nbytes(shape: tuple[int, ...], dtype: str) -> list[int]:
    """Sizes of the `.npy` members `encode_members` writes for an output of `shape` stored in
    `dtype` (fp16 ...), from the shape alone: exact npy headers plus the values."""
    _check_dtype(dtype, "float32")
    shape = tuple(int(s) for s in shape)
    if dtype == "fp8":
        return [_npy_nbytes(np.dtype(np.uint8), shape), _npy_nbytes(np.dtype("<f4"), (1,))]
    if dtype == "bf16":
        return [_npy_nbytes(np.dtype("<u2"), shape)]
    return [_npy_nbytes(np.dtype({"fp32": "<f4", "fp16": "<f2"}[dtype]), shape)]


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
    return _npy_nbytes(*stored_layout(shape, dtype, bf16_layout))


def _npy_nbytes(stored_dtype: np.dtype, stored_shape: tuple[int, ...]) -> int:
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
    scale, bits = _fp8_scale_and_bits(values)
    stored = np.zeros((), dtype=_fp8_dtype(values.shape))
    stored["scale"] = scale
    stored["bits"] = bits
    return stored


def _fp8_scale_and_bits(values: np.ndarray) -> tuple[np.float32, np.ndarray]:
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
    return scale, bits
