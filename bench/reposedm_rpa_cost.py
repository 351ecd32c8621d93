"""FLOPs of RePoseDM's Recurrent Pose Alignment per training sample, `--rpa-warp latent`
(default: the stored source latent warped, a learned conv re-encodes) against `pixels`
(eq. 9 as written: the source image warped and re-encoded by the frozen SD VAE encoder in
every iteration), side by side in one run (a script to run by hand, not a test; no GPU).

    python bench/reposedm_rpa_cost.py                 # 512x352 and 256x176, the paper preset
    python bench/reposedm_rpa_cost.py --res 256x176

Both variants are the paper preset's RPA (D = 96, R = 4, N = 5: 6 MapFormer passes, RHWF's
count) with the full-size `vae:sd15` encoder, built on the meta device and counted with
`torch.utils.flop_counter.FlopCounterMode` over forward + backward (matmuls and
convolutions; grid_sample and elementwise work are not FLOPs here) of a loss on F_S^N, as
in training: the flow learns through the warp, so with pixels the backward goes through
the frozen encoder to its input (no weight gradients). The whole step is the `reposedm`
row of bench/results/limits.json (counted with the latent warp, guidance on) when it was
made at the same resolution, plus the difference. Writes bench/results/reposedm_rpa_cost.json
and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from report import git_commit  # bench/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

RESULTS = REPO / "bench" / "results"


def count(resolution: tuple[int, int], warp: str) -> dict[str, Any]:
    """FLOPs of one sample's RPA forward + backward, and how many VAE encoder passes it runs."""
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from posedata.extractors import create_extractor
    from posedata.train.reposedm import reposedm_presets
    from posedata.train.reposedm_rpa import RecurrentPoseAlignment, VaeSourceEncoder

    height, width = resolution
    model = reposedm_presets()["paper"].model
    vae_spec = create_extractor("vae:sd15", weights="random", resolution=resolution)
    with torch.device("meta"):
        rpa = RecurrentPoseAlignment(4, model["rpa_dim"], model["rpa_radius"], model["rpa_iterations"])
        vae = AutoencoderKL(**vae_spec.architecture_config())
        factor = vae_spec.downsampling_factor()
        source = torch.randn(1, 4, height // factor, width // factor)
        pose = torch.randn(1, 4, height // factor, width // factor)
        pixels = torch.randn(1, 3, height, width)
    encoder = VaeSourceEncoder(vae, 0.18215)
    passes = 0

    def encode(x):
        nonlocal passes
        passes += 1
        return encoder(x)

    counter = FlopCounterMode(display=False)
    with counter:
        features, _, _ = rpa(source, pose, pixels, encode) if warp == "pixels" else rpa(source, pose)
        features.float().pow(2).mean().backward()
    return {"warp": warp, "flops_per_sample": float(counter.get_total_flops()), "vae_encoder_passes": passes,
            "rpa_parameters": sum(p.numel() for p in rpa.parameters())}


def step_flops(resolution: tuple[int, int]) -> float | None:
    """The `reposedm` training step per sample from limits.json, if counted at `resolution`."""
    path = RESULTS / "limits.json"
    if not path.is_file():
        return None
    limits = json.loads(path.read_text())
    if tuple(limits.get("resolution", ())) != tuple(resolution):
        return None
    return next((float(r["flops_per_sample"]) for r in limits["training"] if r.get("plugin") == "reposedm"), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--res", action="append", default=None, help="HxW (repeatable; default 512x352 and 256x176)")
    args = parser.parse_args()
    resolutions = [tuple(int(v) for v in r.split("x")) for r in (args.res or ["512x352", "256x176"])]
    rows = []
    for res in resolutions:
        latent, pixels = count(res, "latent"), count(res, "pixels")
        step = step_flops(res)
        rows.append({"resolution": list(res), "latent": latent, "pixels": pixels,
                     "pixels_over_latent_rpa": pixels["flops_per_sample"] / latent["flops_per_sample"],
                     "step_latent": step,
                     "step_pixels": None if step is None else step + pixels["flops_per_sample"] - latent["flops_per_sample"]})
    result = {"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "git": git_commit(),
              "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reposedm_rpa_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| resolution | RPA latent (TFLOPs) | RPA pixels (TFLOPs) | pixels / latent | VAE encoder passes (pixels) | step latent | step pixels |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        step = "-" if r["step_latent"] is None else f"{r['step_latent'] / 1e12:.2f}"
        step_px = "-" if r["step_pixels"] is None else f"{r['step_pixels'] / 1e12:.2f}"
        lines.append(f"| {r['resolution'][0]}x{r['resolution'][1]} | {r['latent']['flops_per_sample'] / 1e12:.3f} | "
                     f"{r['pixels']['flops_per_sample'] / 1e12:.2f} | {r['pixels_over_latent_rpa']:.0f}x | "
                     f"{r['pixels']['vae_encoder_passes']} (+ backward to the input) | {step} | {step_px} |")
    table = "\n".join(lines)
    (RESULTS / "reposedm_rpa_cost.md").write_text(
        "# RePoseDM RPA: latent vs pixel warp, FLOPs per training sample (forward + backward)\n\n"
        f"`{result['command']}` at {result['git']}, {result['date']}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
