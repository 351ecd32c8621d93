"""What the numbers mean, to look at: the best and the worst pairs by one metric, each row
source | generated | ground truth, with the pair's numbers underneath."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from posedata.show import BACKGROUND, CELL_HEIGHT, TEXT, _clip

CAPTION = 30
PAD = 8
HEADERS = ("source", "generated", "ground truth")


def chosen_pairs(per_pair: list[dict[str, Any]], rank_by: str | None, lower_is_better: bool, count: int) -> list[tuple[str, list[int]]]:
    """[(label, pair indices)]: the `count` best and `count` worst pairs by `rank_by`, or
    all pairs (best first) when there are no more than 2 x count."""
    order = list(range(len(per_pair)))
    if rank_by is not None:
        order.sort(key=lambda i: _sort_value(per_pair[i].get(rank_by), lower_is_better))
    if len(order) > 2 * count:
        return [("best", order[:count]), ("worst", order[-count:][::-1])]
    return [("all pairs, best first" if rank_by else "all pairs", order)]


def best_and_worst_sheet(sections: list[tuple[str, list[int]]], per_pair: list[dict[str, Any]], rows: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """One row per chosen pair: source | generated | ground truth (the last two as the
    protocol measured them), the keys and the pair's numbers underneath."""
    cell_w = max(round(CELL_HEIGHT * truth.shape[1] / truth.shape[0]) for _, _, truth in rows.values())
    font = ImageFont.load_default()
    n_rows = sum(len(indices) for _, indices in sections)
    width = len(HEADERS) * (cell_w + PAD) + PAD
    sheet = Image.new("RGB", (width, 44 + len(sections) * 22 + n_rows * (CELL_HEIGHT + CAPTION)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, 6), title, fill=TEXT, font=font)
    for c, name in enumerate(HEADERS):
        draw.text((PAD + c * (cell_w + PAD), 26), name, fill=TEXT, font=font)
    y = 44
    for label, indices in sections:
        draw.text((PAD, y + 4), label, fill=(255, 200, 120), font=font)
        y += 22
        for i in indices:
            pair = per_pair[i]
            for c, cell in enumerate(rows[i]):
                sheet.paste(_fit(cell, cell_w), (PAD + c * (cell_w + PAD), y))
            numbers = "  ".join(f"{k} {pair[k]:.4f}" for k in ("lpips", "ssim", "psnr", "mask_lpips", "mask_ssim") if isinstance(pair.get(k), float))
            draw.text((PAD, y + CELL_HEIGHT + 3), _clip(f"{pair['source_key']} -> {pair['target_key']}", width), fill=TEXT, font=font)
            draw.text((PAD, y + CELL_HEIGHT + 15), numbers, fill=TEXT, font=font)
            y += CELL_HEIGHT + CAPTION
    sheet.save(path)
    return path


def _sort_value(value: Any, lower_is_better: bool) -> float:
    if not isinstance(value, float) or not np.isfinite(value):
        return float("inf")  # unknown values go last
    return value if lower_is_better else -value


def _fit(image: np.ndarray, cell_w: int) -> Image.Image:
    """Scaled to the row height, keeping its aspect ratio (a padded or stretched protocol
    file shows as the protocol saw it)."""
    im = Image.fromarray(np.asarray(image)).convert("RGB")
    w = min(cell_w, round(im.width * CELL_HEIGHT / im.height))
    return im.resize((w, CELL_HEIGHT), Image.Resampling.BILINEAR)
