"""What a run directory shows a person: config.json (everything the run used), loss.csv,
loss.png (drawn with PIL) and the versions of the stack."""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from posedata.train.plugin import Plugin

LOSS_FIELDS = ["step", "loss", "lr", "samples_per_s"]


class LossLog:
    """loss.csv, appended row by row (main process only)."""

    def __init__(self, path: Path, step: int):
        trim_loss_log(path, step)
        self.file = open(path, "a", newline="")  # noqa: SIM115 (closed by close())
        self.writer = csv.writer(self.file)
        if self.file.tell() == 0:
            self.writer.writerow(LOSS_FIELDS)

    def write(self, step: int, loss: float, lr: float, rate: float) -> None:
        self.writer.writerow([step, f"{loss:.6g}", f"{lr:.6g}", f"{rate:.2f}"])

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def write_config(out: Path, plugin: Plugin, model, ckpt: Path | None, step: int, settings: dict[str, Any]) -> None:
    path = out / "config.json"
    if ckpt is not None and path.exists():
        os.replace(path, out / f"config.prev-{step}.json")
    config = {
        **settings,
        "plugin_class": f"{type(plugin).__module__}:{type(plugin).__qualname__}",
        "preset": plugin.preset_name,
        "plugin_defaults": plugin.defaults.to_dict(),
        "plugin_options": dict(plugin.options),
        "resumed_from": str(ckpt) if ckpt else None,
        "start_step": step,
        "model_class": type(model).__name__,
        "model_config": dict(getattr(model, "config", {}) or {}),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "dataset": {k: plugin.card.get(k) for k in ("name", "resolution") if k in plugin.card},
        "versions": versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path.write_text(json.dumps(config, indent=2, default=str) + "\n")


def versions() -> dict[str, str]:
    import platform

    import accelerate
    import diffusers

    found = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
             "accelerate": accelerate.__version__, "numpy": np.__version__}
    for name in ("posedata", "transformers", "safetensors", "webdataset"):
        try:
            from importlib.metadata import version

            found[name] = version(name)
        except Exception:  # noqa: BLE001, S110 (not installed as a distribution)
            pass
    if torch.cuda.is_available():
        found["cuda"] = str(torch.version.cuda)
        found["gpu"] = torch.cuda.get_device_name()
    return found


def read_loss_log(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def trim_loss_log(path: Path, step: int) -> None:
    """Drop rows past `step` (logged after the checkpoint we resume from)."""
    rows = [r for r in read_loss_log(path) if r["step"] <= step]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(LOSS_FIELDS)
        for r in rows:
            w.writerow([int(r["step"]), f"{r['loss']:.6g}", f"{r['lr']:.6g}", f"{r['samples_per_s']:.2f}"])


def plot_loss(csv_path: Path, png_path: Path, title: str = "loss", size: tuple[int, int] = (640, 360)) -> None:
    """The loss curve (raw in light grey, moving average in blue), drawn with PIL."""
    rows = [r for r in read_loss_log(csv_path) if math.isfinite(r["loss"])]
    w, h = size
    left, right, top, bottom = 64, 16, 28, 36
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((left, 8), title, fill="black", font=font)
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    if rows:
        steps = [r["step"] for r in rows]
        losses = [r["loss"] for r in rows]
        k = max(1, len(losses) // 25)
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1.0
        s0, s1 = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1

        def xy(s: float, v: float) -> tuple[float, float]:
            return (left + (s - s0) / (s1 - s0) * (w - left - right), h - bottom - (v - lo) / (hi - lo) * (h - top - bottom))

        for series, colour in ((losses, (190, 190, 190)), (smooth, (31, 90, 200))):
            points = [xy(s, v) for s, v in zip(steps, series)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            else:
                draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
        for v in (lo, (lo + hi) / 2, hi):
            y = xy(s0, v)[1]
            draw.line([left - 4, y, left, y], fill="black")
            draw.text((4, y - 6), f"{v:.4g}", fill="black", font=font)
        for s in (s0, s1):
            x = xy(s, lo)[0]
            draw.text((x - 10, h - bottom + 6), f"{int(s)}", fill="black", font=font)
        draw.text((w // 2 - 12, h - 16), "step", fill="black", font=font)
        draw.text((w - right - 150, 8), f"last {losses[-1]:.4g} (avg {smooth[-1]:.4g})", fill="black", font=font)
    tmp = png_path.with_name(f".tmp-{png_path.name}")
    img.save(tmp, format="PNG")
    os.replace(tmp, png_path)
