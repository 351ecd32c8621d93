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


def best_and_worst_sheet(
    per_pair: list[dict[str, Any]],
    stored: dict[str, dict[str, Any]],
    generated: list[np.ndarray],
    truths: list[np.ndarray],
    rank_by: str | None,
    lower_is_better: bool,
    path: Path,
    count: int,
    title: str,
) -> Path:
    """`count` best and `count` worst pairs by `rank_by` (all pairs, in order, when there
    are no more than 2 x count, or no metric to rank by)."""
    order = list(range(len(per_pair)))
    if rank_by is not None:
        order.sort(key=lambda i: _sort_value(per_pair[i].get(rank_by), lower_is_better))
    if len(order) > 2 * count:
        sections = [("best", order[:count]), ("worst", order[-count:][::-1])]
    else:
        sections = [("all pairs, best first" if rank_by else "all pairs", order)]

    cell_w = max(round(CELL_HEIGHT * t.shape[1] / t.shape[0]) for t in truths)
    font = ImageFont.load_default()
    rows = sum(len(idx) for _, idx in sections)
    width = len(HEADERS) * (cell_w + PAD) + PAD
    height = 44 + len(sections) * 22 + rows * (CELL_HEIGHT + CAPTION)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
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
            cells = (stored[pair["source_key"]]["image"], generated[i], truths[i])
            for c, cell in enumerate(cells):
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
