"""The same samples under the five evaluation protocols: how far SSIM and PSNR move with the
protocol alone.

    python bench/eval_protocols.py      # writes bench/results/eval_protocols.{json,md}

A script to run by hand, not a test. The fixture photos (../shared/fixtures/deepfashion, or
--root) are resized to 256x176 as `posedata build` stores them (PIL bicubic, without the
JPEG step), each is "generated" by a known distortion of itself, and every protocol of
`posedata eval` measures the same (generated, truth) pairs through its own rules
(`Protocol.truth_file`, `generated_file`, `ssim_inputs`, `psnr_inputs`). LPIPS and FID are
left out: without the real AlexNet / Inception weights their numbers would mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from posedata.eval import metrics as M
from posedata.eval.protocol import REGISTRY, create_protocol
from posedata.images import resize

HERE = Path(__file__).resolve().parent
STORED = (256, 176)


def noisy(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, image.shape)
    return np.clip(image.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)


DISTORTIONS = {
    "gaussian noise, sigma 10": lambda im, i: noisy(im, 10, i),
    "gaussian noise, sigma 20": lambda im, i: noisy(im, 20, i),
    "gaussian blur, radius 1.5": lambda im, i: np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(1.5))),
    "shifted 4 px right": lambda im, i: np.pad(im, ((0, 0), (4, 0), (0, 0)), mode="edge")[:, :-4],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(HERE.parent.parent / "shared" / "fixtures" / "deepfashion"))
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    photos = sorted(p for p in Path(args.root).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    truths = [np.asarray(resize(Image.open(p).convert("RGB"), *STORED)) for p in photos]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, distort in DISTORTIONS.items():
        results[name] = {}
        for protocol_name in REGISTRY:
            p = create_protocol(protocol_name, STORED)
            ssim, psnr = [], []
            for i, stored in enumerate(truths):
                truth = p.truth_file(stored)
                generated = p.generated_file(distort(stored, i), truth.shape[:2])
                ssim.append(M.ssim(*p.ssim_inputs(generated, truth), sigma=p.ssim_sigma))
                if "psnr" in p.metrics:
                    psnr.append(M.psnr(*p.psnr_inputs(generated, truth)))
            results[name][protocol_name] = {"ssim": float(np.mean(ssim)), **({"psnr": float(np.mean(psnr))} if psnr else {})}

    protocols = list(REGISTRY)
    lines = [f"Same samples ({len(photos)} fixture photos at 256x176, each distorted), SSIM / PSNR per protocol", "",
             "| distortion | " + " | ".join(protocols) + " | SSIM spread |", "|---|" + "---|" * (len(protocols) + 1)]
    for name, row in results.items():
        cells = [f"{row[p]['ssim']:.4f}" + (f" / {row[p]['psnr']:.2f} dB" if "psnr" in row[p] else "") for p in protocols]
        spread = max(r["ssim"] for r in row.values()) - min(r["ssim"] for r in row.values())
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {spread:.4f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_protocols.json").write_text(json.dumps({"photos": [p.name for p in photos], "stored": STORED, "results": results, "machine": platform.platform()}, indent=2) + "\n")
    (out / "eval_protocols.md").write_text(table + "\n")
    print(f"wrote {out / 'eval_protocols.json'} and {out / 'eval_protocols.md'}")


if __name__ == "__main__":
    main()
