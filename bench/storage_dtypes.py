"""Storage dtypes of float features (`--dtype fp16|bf16|fp8|fp32`): round-trip error per
feature, and bytes per sample per feature at 256x176 and 512x352.

    python bench/storage_dtypes.py                # writes bench/results/storage_dtypes.{json,md}
    python bench/storage_dtypes.py --skip-tiny    # without the tiny-model run (faster)

A script to run by hand, not a test. Every value goes through the real code path:
`posedata.storage.encode_members` -> `np.save` -> `np.load(allow_pickle=False)` ->
`decode_output_members` (fp8: `<name>.e4m3.npy` + `<name>.scale.npy`; bf16: `<name>.bf16.npy`).

Inputs. No real model weights are available here, so the errors are measured on
1. synthetic stand-ins whose value distributions imitate the real features (assumptions in
   SYNTHETIC below; a real-weights run should replace them), and
2. the real extractors in `weights="tiny"` mode (tiny random-init configs of the same
   architectures) on the fixture photos: real code, real shapes where the shape does not
   depend on the model width, but value distributions of random weights, not trained ones.

Bytes per sample: every tar member costs its header plus its data padded to 512 bytes. A plain
ustar header is 512 bytes; the header size used here is measured on a tar written by
`posedata.shards.tar_bytes` (webdataset's TarWriter adds a 1024-byte PAX header per member when
its `mtime` is a float, as 0.0 is). `.npy` sizes are computed from the shape
(`posedata.storage.member_nbytes`: exact npy headers + values; fp8 is two members, the bits and
the scale) and checked against `np.save` of encoded data; PNG / JPEG / JSON sizes are measured on renders, synthetic label maps and the
fixture photos. The once-per-shard end of archive is left out (checked in `tar_check`).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from report import git_commit  # noqa: E402

from posedata.extractors.base import numpy_store_dtype, stored_dtype_label
from posedata.images import decode_image, encode_jpeg, encode_png, resize
from posedata.render import COCO18_NAMES, draw_openpose
from posedata.shards import tar_bytes
from posedata.storage import FP8_E4M3_MAX, decode_output_members, encode_members, member_nbytes

RESOLUTIONS = ((256, 176), (512, 352))
FIXTURES = Path(os.environ.get("POSEDATA_FIXTURES", REPO.parent / "shared" / "fixtures")) / "deepfashion"

# (label, --dtype, unused). bf16 is stored as uint16 bit patterns, fp8 as uint8 bits plus a
# float32 scale member (posedata.storage).
STORAGE_CHOICES = (
    ("fp32", "fp32", ""),
    ("fp16", "fp16", ""),
    ("bf16", "bf16", ""),
    ("fp8", "fp8", ""),
)
# fp32 is stored exactly.
ERROR_CHOICES = ("fp16", "bf16", "fp8")

TAR_BLOCK = 512
# A DeepFashion key as the sources write it (46 characters): member names stay under 100.
EXAMPLE_KEY = "fashionWOMENBlouses_Shirtsid0000000102_1front"
# Parsing classes present in a typical full-body photo (ATR: hair, face, upper-clothes,
# pants, both arms, both shoes); also the number of clip_regions rows.
TYPICAL_REGIONS = 8

# ---- synthetic stand-ins ---------------------------------------------------------------------

SYNTHETIC = {
    "clip": "image_embeds ~ N(-0.016, 0.415^2) i.i.d. per dim: the mean / std PCDMs' prior "
    "normalises its target with, (e + 0.016) / 0.415",
    "dinov2": "last_hidden_state ~ N(0, 2^2) with 4 fixed outlier channels holding "
    "+-U(50, 100) in every token (ViT 'massive activations': a few channels orders of magnitude "
    "above the rest; the magnitudes are our guess). With one scale per tensor the outliers set "
    "the fp8 scale: the worst case for the bulk of the values",
    "vae_mean": "posterior mean ~ N(0, 5.5^2): SD latents are multiplied by scaling_factor 0.18215 "
    "to get unit variance, so the raw mean has std ~ 1 / 0.18215 ~ 5.5",
    "vae_std": "posterior std ~ exp(N(-4, 1)) (log-normal, median 0.018; a guess: the KL weight of "
    "the SD VAE is tiny, so posterior stds are small). fp16 keeps full relative precision only "
    "above 6.1e-5 (its smallest normal); stds far below that would favour bf16 or fp8",
    "pose_features": "HRNet stage-4 branch output: ReLU(N(0, 1)) times a per-channel log-normal "
    "gain exp(N(0, 1)) (non-negative, half zeros; magnitudes a guess, the tiny run agrees in kind)",
}


def synthetic_clip(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.normal(-0.016, 0.415, size=(n, 1024)).astype(np.float32)


def synthetic_dinov2(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    tokens = rng.normal(0.0, 2.0, size=(n, 257, width)).astype(np.float32)
    outliers = rng.choice(width, size=4, replace=False)
    signs = rng.choice([-1.0, 1.0], size=4)
    tokens[:, :, outliers] = signs * rng.uniform(50, 100, size=(n, 257, 4))
    return tokens


def synthetic_vae(rng: np.random.Generator, n: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    shape = (n, 4, height // 8, width // 8)
    mean = rng.normal(0.0, 5.5, size=shape).astype(np.float32)
    std = np.exp(rng.normal(-4.0, 1.0, size=shape)).astype(np.float32)
    return mean, std


def synthetic_pose_features(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    values = np.maximum(rng.normal(size=(n, 32, height // 4, width // 4)), 0.0)
    gain = np.exp(rng.normal(size=(n, 32, 1, 1)))
    return (values * gain).astype(np.float32)


# ---- round-trip error ------------------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encoded(sample: np.ndarray, dtype: str) -> dict[str, bytes]:
    """One output stored in `dtype`: {member suffix: .npy bytes}, as the build writes them."""
    # the extractor's own cast first (fp16 / fp32), as the build does; bf16 / fp8 from float32
    value = np.asarray(sample, dtype=numpy_store_dtype(dtype))
    return {m: npy_bytes(a) for m, a in encode_members("x.npy", value, stored_dtype_label(dtype)).items()}


def round_trip(sample: np.ndarray, dtype: str) -> np.ndarray:
    """One sample through the stored .npy members and back, as float32."""
    loaded = {m: np.load(io.BytesIO(data), allow_pickle=False) for m, data in encoded(sample, dtype).items()}
    return np.asarray(decode_output_members("x.npy", loaded), dtype=np.float32)


def round_trip_errors(samples: np.ndarray, dtype: str, embedding: bool) -> dict[str, float]:
    """Errors over samples [N, ...], each sample encoded on its own (fp8: one scale each).
    Embeddings also get the cosine similarity of every vector along the last axis (a CLIP
    embedding, a DINOv2 token)."""
    decoded = np.stack([round_trip(sample, dtype) for sample in samples]).astype(np.float64)
    exact = samples.astype(np.float64)
    error = np.abs(decoded - exact)
    result = {
        "max_abs_error": float(error.max()),
        "mean_abs_error": float(error.mean()),
        # Relative to the values' typical magnitude (std would mislead for the VAE std, whose
        # values sit far from 0 with a small spread).
        "mean_abs_error_relative": float(error.mean() / np.abs(exact).mean()),
    }
    if embedding:
        a = exact.reshape(-1, exact.shape[-1])
        b = decoded.reshape(-1, exact.shape[-1])
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosine = np.einsum("ij,ij->i", a, b)[norms > 0] / norms[norms > 0]
        result.update(
            {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()), "vectors": int(cosine.size)}
        )
    return result


@dataclass
class ErrorCase:
    feature: str
    output: str
    samples: np.ndarray
    embedding: bool
    source: str  # "synthetic" or "tiny random weights"


def synthetic_cases(n: int, seed: int) -> list[ErrorCase]:
    rng = np.random.default_rng(seed)
    n_large = max(2, n // 8)  # DINOv2 tokens and 1/4-resolution maps are large per sample
    cases = [
        ErrorCase("clip", "embeds.npy", synthetic_clip(rng, n), True, "synthetic"),
        ErrorCase("dinov2 (giant)", "tokens.npy", synthetic_dinov2(rng, n_large, 1536), True, "synthetic"),
        ErrorCase("dinov2 (base)", "tokens.npy", synthetic_dinov2(rng, n_large, 768), True, "synthetic"),
    ]
    for height, width in RESOLUTIONS:
        mean, std = synthetic_vae(rng, n, height, width)
        cases += [
            ErrorCase(f"vae {height}x{width}", "mean.npy", mean, False, "synthetic"),
            ErrorCase(f"vae {height}x{width}", "std.npy", std, False, "synthetic"),
            ErrorCase(
                f"higherhrnet {height}x{width}",
                "pose_features.npy",
                synthetic_pose_features(rng, n_large, height, width),
                False,
                "synthetic",
            ),
        ]
    return cases


def fixture_photos() -> list[tuple[str, Image.Image]]:
    """(name, upright RGB PIL image) of every fixture photo, read in place."""
    photos = []
    for path in sorted(FIXTURES.iterdir()):
        if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            photos.append((path.name, decode_image(path.read_bytes(), str(path))))
    if not photos:
        raise SystemExit(f"no fixture photos in {FIXTURES}; set POSEDATA_FIXTURES")
    return photos


def tiny_model_cases(photos) -> list[ErrorCase]:
    """The real extractors, tiny random-init weights, fp32 output, on the fixture photos."""
    from posedata.extractors import create_extractor
    from posedata.extractors.base import Sample

    cases = []
    embedding_outputs = {"embeds.npy", "tokens.npy"}
    for height, width in RESOLUTIONS:
        batch = [
            Sample(
                key=name, image=np.asarray(resize(image, height, width)), annotations={}, original_size=image.size[::-1]
            )
            for name, image in photos
        ]
        for name, outputs in (
            ("clip", ["embeds.npy"]),
            ("dinov2", ["tokens.npy"]),
            ("vae", ["mean.npy", "std.npy"]),
            ("higherhrnet", ["pose_features.npy"]),
        ):
            extractor = create_extractor(name, weights="tiny", resolution=(height, width), dtype="fp32")
            extractor.setup("cpu")
            results = extractor(batch)
            for output in outputs:
                samples = np.stack([np.asarray(r[output], dtype=np.float32) for r in results])
                cases.append(
                    ErrorCase(
                        f"{name} {height}x{width}", output, samples, output in embedding_outputs, "tiny random weights"
                    )
                )
    return cases


def measure_errors(cases: list[ErrorCase]) -> list[dict]:
    rows = []
    for case in cases:
        for dtype in ERROR_CHOICES:
            rows.append(
                {
                    "source": case.source,
                    "feature": case.feature,
                    "output": case.output,
                    "shape": list(case.samples.shape[1:]),
                    "samples": int(case.samples.shape[0]),
                    "dtype": dtype,
                    "value_abs_max": float(np.abs(case.samples).max()),
                    **round_trip_errors(case.samples, dtype, case.embedding),
                }
            )
    return rows


# ---- bytes per sample ------------------------------------------------------------------------


def measured_header_bytes() -> int:
    """Bytes posedata's tar writer puts before each member's data (512 for a plain ustar
    header, 1536 with a PAX header in front)."""
    data = tar_bytes([{"__key__": EXAMPLE_KEY, "embeds.npy": b"x"}])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.getmembers()[0]
    return member.offset_data - member.offset


HEADER_BYTES = measured_header_bytes()


def tar_member_bytes(data_bytes: int, header_bytes: int = HEADER_BYTES) -> int:
    return header_bytes + -(-data_bytes // TAR_BLOCK) * TAR_BLOCK


@dataclass
class Member:
    """One tar member per sample. Float members follow --dtype; the others have one size."""

    suffix: str
    shape: tuple
    float_feature: bool = False
    fixed_bytes: int | None = None  # measured size of a fixed member
    note: str = ""

    def data_bytes(self, dtype: str) -> list[int]:
        """Sizes of the tar members that hold it (fp8: the bits and the scale)."""
        return member_nbytes(self.shape, dtype) if self.float_feature else [int(self.fixed_bytes)]


def npy_size(array: np.ndarray) -> int:
    return len(npy_bytes(array))


# A front-facing standing person filling the frame as in DeepFashion's full-body shots:
# (x, y) as fractions of the frame width / height, OpenPose COCO-18 order.
STANDING_PERSON = {
    "nose": (0.50, 0.12),
    "neck": (0.50, 0.21),
    "r_shoulder": (0.36, 0.22),
    "r_elbow": (0.31, 0.37),
    "r_wrist": (0.29, 0.51),
    "l_shoulder": (0.64, 0.22),
    "l_elbow": (0.69, 0.37),
    "l_wrist": (0.71, 0.51),
    "r_hip": (0.41, 0.50),
    "r_knee": (0.40, 0.69),
    "r_ankle": (0.40, 0.88),
    "l_hip": (0.59, 0.50),
    "l_knee": (0.60, 0.69),
    "l_ankle": (0.60, 0.88),
    "r_eye": (0.47, 0.10),
    "l_eye": (0.53, 0.10),
    "r_ear": (0.44, 0.11),
    "l_ear": (0.56, 0.11),
}


def standing_person(height: int, width: int) -> np.ndarray:
    """[18, 3] keypoints (x, y, score) of STANDING_PERSON in an H x W frame."""
    points = [STANDING_PERSON[name] for name in COCO18_NAMES]
    return np.array([(x * width, y * height, 1.0) for x, y in points], dtype=np.float32)


def synthetic_label_map(height: int, width: int) -> np.ndarray:
    """A blocky ATR label map of the standing person: smooth shapes, 8 classes. Real parser
    output has ragged boundaries, so real PNGs are somewhat larger."""
    import cv2

    kp = standing_person(height, width)[:, :2].astype(np.int32)
    labels = np.zeros((height, width), dtype=np.uint8)
    limb = max(3, width // 18)
    hair, upper, pants, left_shoe, right_shoe, face, left_arm, right_arm = 2, 4, 6, 9, 10, 11, 14, 15

    def line(a: int, b: int, label: int, thickness: int) -> None:
        cv2.line(labels, tuple(map(int, kp[a])), tuple(map(int, kp[b])), label, thickness)

    cv2.ellipse(
        labels, (int(kp[0, 0]), int(kp[0, 1] - height * 0.02)), (width // 11, height // 16), 0, 0, 360, hair, -1
    )
    cv2.ellipse(labels, tuple(map(int, kp[0])), (width // 14, height // 20), 0, 0, 360, face, -1)
    cv2.fillConvexPoly(labels, kp[[2, 5, 11, 8]], upper)
    for a, b, c in ((8, 9, 10), (11, 12, 13)):
        line(a, b, pants, limb * 2)
        line(b, c, pants, int(limb * 1.6))
    for a, b, label in ((2, 3, right_arm), (3, 4, right_arm), (5, 6, left_arm), (6, 7, left_arm)):
        line(a, b, label, limb)
    for ankle, label in ((10, right_shoe), (13, left_shoe)):
        cv2.ellipse(
            labels,
            (int(kp[ankle, 0]), int(kp[ankle, 1] + height * 0.03)),
            (width // 16, height // 40),
            0,
            0,
            360,
            label,
            -1,
        )
    return labels


def base_image_bytes(photos, height: int, width: int) -> dict:
    """JPEG q95 4:4:4 of the fixture photos resized to H x W, as the build stores them. Only
    photos at least that large count (an upscaled small photo compresses unrealistically well)."""
    sizes = {
        name: len(encode_jpeg(resize(image, height, width)))
        for name, image in photos
        if image.size[0] >= width and image.size[1] >= height
    }
    return {"mean": int(np.mean(list(sizes.values()))), "per_photo": sizes}


def example_meta(height: int, width: int) -> bytes:
    return json.dumps(
        {
            "key": EXAMPLE_KEY,
            "split": "train",
            "group": "id_00000001",
            "source_path": "/data/DeepFashion/img_highres/WOMEN/Blouses_Shirts/id_00000001/02_1_front.jpg",
            "original_size": [1101, 750],
        },
        sort_keys=True,
    ).encode()


def feature_members(height: int, width: int, photos) -> tuple[dict[str, list[Member]], dict]:
    """feature -> its members per sample at H x W, plus the measured image details."""
    h8, w8, h4, w4, m = height // 8, width // 8, height // 4, width // 4, TYPICAL_REGIONS
    jpeg = base_image_bytes(photos, height, width)
    skeleton = len(encode_png(draw_openpose(standing_person(height, width), height, width)))
    labels = len(encode_png(synthetic_label_map(height, width)))

    def int32(*shape: int) -> int:
        return npy_size(np.zeros(shape, dtype=np.int32))

    def float32(*shape: int) -> int:
        return npy_size(np.zeros(shape, dtype=np.float32))

    vae = [Member(s, (4, h8, w8), True) for s in ("mean.npy", "std.npy")]
    features = {
        "base image (shards/)": [
            Member(
                "jpg",
                (height, width, 3),
                fixed_bytes=jpeg["mean"],
                note=f"JPEG q95 4:4:4, mean of {len(jpeg['per_photo'])} fixture photos",
            ),
            Member("json", (), fixed_bytes=len(example_meta(height, width)), note="sample meta"),
        ],
        "openpose": [
            Member("keypoints.npy", (18, 3), fixed_bytes=float32(18, 3), note="float32 always"),
            Member("skeleton.png", (height, width, 3), fixed_bytes=skeleton, note="draw_openpose of a standing person"),
        ],
        "parsing": [
            Member("labels.png", (height, width), fixed_bytes=labels, note=f"synthetic blocky map, {m} classes"),
            Member("classes.npy", (m,), fixed_bytes=int32(m)),
            Member("pixels.npy", (m,), fixed_bytes=int32(m)),
            Member("boxes.npy", (m, 4), fixed_bytes=int32(m, 4)),
        ],
        "clip": [Member("embeds.npy", (1024,), True)],
        "clip_regions": [Member("embeds.npy", (m, 1024), True), Member("classes.npy", (m,), fixed_bytes=int32(m))],
        "dinov2 (giant)": [Member("tokens.npy", (257, 1536), True)],
        "dinov2 (base)": [Member("tokens.npy", (257, 768), True)],
        "vae": vae,
        "vae --flip": vae + [Member(s, (4, h8, w8), True) for s in ("mean_flip.npy", "std_flip.npy")],
        "higherhrnet": [
            Member("keypoints.npy", (17, 3), fixed_bytes=float32(17, 3), note="float32 always"),
            Member("pose_features.npy", (32, h4, w4), True),
        ],
    }
    return features, {"jpeg": jpeg, "skeleton_png": skeleton, "labels_png": labels}


# One of each: the base image, every feature once, dinov2 giant (PCDMs), vae without --flip.
FULL_BUILD = (
    "base image (shards/)",
    "openpose",
    "parsing",
    "clip",
    "clip_regions",
    "dinov2 (giant)",
    "vae",
    "higherhrnet",
)


def measure_bytes(photos) -> dict:
    rng = np.random.default_rng(0)
    results = {}
    for height, width in RESOLUTIONS:
        features, images = feature_members(height, width, photos)
        rows, totals = [], {}
        for feature, members in features.items():
            feature_total = {label: 0 for label, _, _ in STORAGE_CHOICES}
            for member in members:
                sample = rng.normal(size=member.shape).astype(np.float32) if member.float_feature else None
                row = {
                    "feature": feature,
                    "member": member.suffix,
                    "shape": list(member.shape),
                    "float_feature": member.float_feature,
                    "note": member.note,
                    "npy_computed": {},
                    "npy_measured": {},
                    "tar_bytes": {},
                }
                for label, dtype, _ in STORAGE_CHOICES:
                    data = member.data_bytes(dtype)
                    if member.float_feature:
                        measured = [len(b) for b in encoded(sample, dtype).values()]
                        if measured != data:
                            raise AssertionError(
                                f"{feature} {member.suffix} {label}: np.save wrote {measured} bytes, computed {data}"
                            )
                        row["npy_computed"][label], row["npy_measured"][label] = sum(data), sum(measured)
                    tar = sum(tar_member_bytes(d) for d in data)
                    row["tar_bytes"][label] = tar
                    feature_total[label] += tar
                rows.append(row)
            totals[feature] = feature_total
        totals["full build"] = {label: sum(totals[f][label] for f in FULL_BUILD) for label, _, _ in STORAGE_CHOICES}
        results[f"{height}x{width}"] = {"members": rows, "per_feature": totals, "images": images}
    results["header_bytes"] = HEADER_BYTES
    # The same members at every resolution.
    results["members_in_full_build"] = sum(len(features[f]) for f in FULL_BUILD)
    results["tar_check"] = tar_check()
    return results


def tar_check() -> dict:
    """The per-member formula against a real sidecar tar written by posedata.shards.tar_bytes."""
    samples_per_shard = 16
    rng = np.random.default_rng(1)
    checks = {}
    for label, dtype, _ in STORAGE_CHOICES:
        members = {"embeds.npy": (1024,), "tokens.npy": (257, 768)}
        samples, formula = [], 0
        for i in range(samples_per_shard):
            sample = {"__key__": f"{EXAMPLE_KEY}{i:04d}"}
            for suffix, shape in members.items():
                value = rng.normal(size=shape).astype(numpy_store_dtype(dtype))
                for member, array in encode_members(suffix, value, stored_dtype_label(dtype)).items():
                    sample[member] = npy_bytes(array)
                    formula += tar_member_bytes(len(sample[member]))
            samples.append(sample)
        actual = len(tar_bytes(samples))
        checks[label] = {
            "samples": samples_per_shard,
            "formula_bytes": formula,
            "tar_bytes": actual,
            "end_of_archive_bytes": actual - formula,
        }
    return checks


# ---- report ----------------------------------------------------------------------------------


def environment(argv: list[str]) -> dict:
    import PIL
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "command": "python " + " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "git_commit": git_commit(),
    }


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def sci(value: float | None) -> str:
    return "" if value is None else f"{value:.2e}"


def error_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        embedding = "cosine_mean" in r
        body.append(
            [
                r["feature"],
                f"{r['output']} {r['shape']}",
                r["samples"],
                r["dtype"],
                sci(1 - r["cosine_mean"]) if embedding else "",
                sci(1 - r["cosine_min"]) if embedding else "",
                sci(r["max_abs_error"]),
                sci(r["mean_abs_error"]),
                sci(r["mean_abs_error_relative"]),
                f"{r['value_abs_max']:.3g}",
            ]
        )
    headers = [
        "feature",
        "output [shape]",
        "samples",
        "dtype",
        "1 - cos, mean",
        "1 - cos, worst",
        "max abs err",
        "mean abs err",
        "mean abs err / mean abs value",
        "max abs value",
    ]
    return table(headers, body)


def bytes_tables(results: dict, resolution: str) -> str:
    labels = [label for label, _, _ in STORAGE_CHOICES]
    data = results[resolution]
    member_rows = []
    for r in data["members"]:
        cells = (
            [f"{r['tar_bytes'][l]:,}" for l in labels]
            if r["float_feature"]
            else [f"{r['tar_bytes']['fp32']:,}"] * len(labels)
        )
        member_rows.append(
            [
                r["feature"],
                r["member"],
                "x".join(map(str, r["shape"])) or "-",
                *cells,
                r["note"] or ("follows --dtype" if r["float_feature"] else ""),
            ]
        )
    feature_rows = [
        [f"**{f}**" if f == "full build" else f, *[f"{t[l]:,}" for l in labels]] for f, t in data["per_feature"].items()
    ]
    full = data["per_feature"]["full build"]
    feature_rows.append(["full build, GB per 100k samples", *[f"{full[l] * 1e5 / 1e9:.1f}" for l in labels]])
    return "\n\n".join(
        [
            f"Per tar member (bytes on disk: {results['header_bytes']}-byte header + data padded to 512):\n\n"
            + table(["feature", "member", "shape", *labels, "note"], member_rows),
            f"Per sample per feature (sum of its members; full build = {', '.join(FULL_BUILD)}):\n\n"
            + table(["feature", *labels], feature_rows),
        ]
    )


def markdown(report: dict) -> str:
    env = report["environment"]
    parts = [
        "# Storage dtypes: round-trip error and bytes per sample",
        "\n".join(
            [
                f"- command: `{env['command']}`",
                f"- date: {env['date']}; git {env['git_commit']}",
                f"- machine: {env['machine']}",
                f"- python {env['python']}, numpy {env['numpy']}, torch {env['torch']}, pillow {env['pillow']}",
            ]
        ),
        (
            "Each sample is encoded on its own (`posedata.storage.encode_members`, fp8: one scale = max abs / "
            f"{FP8_E4M3_MAX:g} per sample tensor, stored as its own member), saved with `np.save`, loaded with "
            "`allow_pickle=False` and decoded. fp32 is exact and not listed. "
            "Cosines are per vector along the last axis (one CLIP embedding, one DINOv2 token); "
            "'worst' is the smallest cosine."
        ),
        "## Round-trip error on synthetic stand-ins (no real weights here)\n\n"
        + "\n".join(f"- {name}: {text}" for name, text in SYNTHETIC.items())
        + "\n\n"
        + error_table([r for r in report["errors"] if r["source"] == "synthetic"]),
    ]
    tiny = [r for r in report["errors"] if r["source"] == "tiny random weights"]
    if tiny:
        parts.append(
            "## Round-trip error of the real extractors with tiny random weights, on the fixture photos\n\n"
            '`create_extractor(name, weights="tiny", dtype="fp32")` on the '
            f"{report['tiny_photos']} photos of `{FIXTURES.parent.name}/{FIXTURES.name}` (each resized to the resolution). "
            "Tiny random-init models: the CLIP / DINOv2 widths are 32, not 1024 / 1536, and the values are "
            "those of random weights, not trained ones.\n\n" + error_table(tiny)
        )
    for resolution in (f"{h}x{w}" for h, w in RESOLUTIONS):
        parts.append(f"## Bytes per sample at {resolution}\n\n" + bytes_tables(report["bytes"], resolution))
    check = report["bytes"]["tar_check"]
    parts.append(
        "All `.npy` sizes computed from shapes equal the sizes `np.save` wrote. Tar check (sidecar of "
        f"{check['fp16']['samples']} samples x [embeds 1024 + tokens 257x768], posedata.shards.tar_bytes): "
        + "; ".join(
            f"{label} {c['tar_bytes']:,} B = formula {c['formula_bytes']:,} + {c['end_of_archive_bytes']:,} end of archive"
            for label, c in check.items()
        )
        + " (the end-of-archive blocks and record padding are paid once per shard)."
    )
    header = report["bytes"]["header_bytes"]
    if header > TAR_BLOCK:
        members = report["bytes"]["members_in_full_build"]
        parts.append(
            f"Tar headers: posedata's writer spends {header} bytes of header per member, {header - TAR_BLOCK} more "
            "than a plain ustar header (webdataset's TarWriter, given the float mtime=0.0, makes Python's tarfile "
            "write a PAX header for it; an int mtime=0 gives the same fixed bytes without it). On the full build's "
            f"{members} members that is {members * (header - TAR_BLOCK):,} bytes per sample."
        )
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--samples", type=int, default=256, help="synthetic samples per feature (large ones use 1/8 of it)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-tiny", action="store_true", help="skip running the tiny random-weight extractors")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)

    started = time.time()
    photos = fixture_photos()
    cases = synthetic_cases(args.samples, args.seed)
    if not args.skip_tiny:
        cases += tiny_model_cases(photos)
    report = {
        "environment": environment([os.path.relpath(sys.argv[0], REPO), *(argv if argv is not None else sys.argv[1:])]),
        "synthetic_assumptions": SYNTHETIC,
        "tiny_photos": len(photos) if not args.skip_tiny else 0,
        "errors": measure_errors(cases),
        "bytes": measure_bytes(photos),
    }
    report["environment"]["seconds"] = round(time.time() - started, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "storage_dtypes.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (args.out / "storage_dtypes.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'storage_dtypes.json'} and {args.out / 'storage_dtypes.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
