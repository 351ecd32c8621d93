"""`posedata show`: a contact sheet to look at instead of reading numbers.

One row per sample: the stored image, then each pose feature drawn over it (extracted
OpenPose, annotated keypoints, ...), with the key and group as caption. Below, the rejects:
a thumbnail of the file where it can still be decoded, and the reason.
"""

from __future__ import annotations

import io
import os
import textwrap
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from posedata.layout import REJECTS
from posedata.reader import Dataset

CELL_HEIGHT = 256
CAPTION = 28
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
POSE_FEATURES = ("openpose", "keypoints_annotated", "higherhrnet")
OVERLAY_FEATURES = ("parsing",)


def contact_sheet(url: str, out: str, count: int = 8, split: str | None = None, storage_options: dict[str, Any] | None = None, max_rejects: int = 8) -> str:
    ds = Dataset(url, storage_options)
    if split is None:  # the first split that has samples
        split = next((s for s, info in ds.card["splits"].items() if info.get("samples")), next(iter(ds.card["splits"])))
    ds.require_samples(split)
    height, width = ds.resolution
    cell_w = round(width * CELL_HEIGHT / height)
    names = {c["name"] for c in ds.card["features"].values()}
    pose_columns = [ds.column(n) for n in POSE_FEATURES if n in names]
    overlay_columns = [ds.column(n) for n in OVERLAY_FEATURES if n in names]
    columns = pose_columns + overlay_columns
    headers = ["image"] + [c.alias for c in columns]

    rows = []
    for sample in ds.samples(split, [c.alias for c in columns], pixels=True, limit=count):
        image = sample["image"]
        cells = [image]
        notes = []
        for column in pose_columns:
            cells.append(_pose_overlay(image, sample, column.alias))
            keypoints = sample.get(f"{column.alias}.keypoints")
            if keypoints is not None:
                notes.append(f"{column.alias} {int((keypoints[:, 2] > 0).sum())}/{len(keypoints)} joints")
        for column in overlay_columns:
            cells.append(_label_overlay(image, sample.get(f"{column.alias}.labels")))
        caption = f"{sample['__key__']}  ({sample['group']})   " + "   ".join(notes)
        rows.append(([_fit(c, cell_w) for c in cells], caption))

    rejects = ds.location.read_parquet(ds.location.path(REJECTS)).to_pylist()[:max_rejects]
    source_root = os.path.expanduser(str(ds.card.get("source", {}).get("root") or ""))
    for reject in rejects:  # tables hold paths relative to --root: find the file to draw it
        reject["file"] = reject["source_path"] if os.path.isabs(reject["source_path"]) else os.path.join(source_root, reject["source_path"])
    sheet = _compose(rows, headers, rejects, cell_w, f"{ds.location.url}  split={split}  {height}x{width}")
    sheet.save(out)
    return out


def _pose_overlay(image: np.ndarray, sample: dict[str, Any], alias: str) -> np.ndarray:
    from posedata.render import draw_openpose

    skeleton = sample.get(f"{alias}.skeleton")
    if skeleton is None:
        keypoints = sample[f"{alias}.keypoints"]
        if len(keypoints) == 17:  # COCO-17 (HigherHRNet): add the neck, reorder to OpenPose's 18
            from posedata.extractors.higherhrnet import coco17_to_coco18

            keypoints = coco17_to_coco18(keypoints)
        skeleton = draw_openpose(keypoints, image.shape[0], image.shape[1])
    mask = skeleton.max(axis=2, keepdims=True) > 0
    dimmed = (image.astype(np.float32) * 0.45).astype(np.uint8)
    return np.where(mask, skeleton, dimmed)


def _label_overlay(image: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    if labels is None:
        return image
    palette = np.random.default_rng(7).integers(40, 255, size=(256, 3), dtype=np.uint8)
    palette[0] = 0
    colours = palette[labels.astype(np.int64)]
    return (image.astype(np.float32) * 0.5 + colours.astype(np.float32) * 0.5).astype(np.uint8)


def _fit(array: np.ndarray, cell_w: int) -> Image.Image:
    return Image.fromarray(array).convert("RGB").resize((cell_w, CELL_HEIGHT), Image.Resampling.BILINEAR)


def _thumbnail(path: str, cell_w: int) -> Image.Image | None:
    """A look at a rejected file, if it still decodes at all."""
    try:
        from posedata.images import read_source_bytes

        im = Image.open(io.BytesIO(read_source_bytes(path)))
        im.draft("RGB", (cell_w, CELL_HEIGHT))
        im = im.convert("RGB")
        im.thumbnail((cell_w, CELL_HEIGHT))
        return im
    except Exception:  # noqa: BLE001 - undecodable is exactly why many of these were rejected
        return None


def _compose(rows, headers, rejects, cell_w, title) -> Image.Image:
    font = ImageFont.load_default()
    n_cols = max(len(headers), 1)
    pad = 8
    sheet_w = max(n_cols * (cell_w + pad) + pad, 4 * (cell_w + pad) + pad)
    header_h = 48
    row_h = CELL_HEIGHT + CAPTION
    reject_cols = max(1, (sheet_w - pad) // (cell_w + pad))
    reject_rows = (len(rejects) + reject_cols - 1) // reject_cols
    reject_h = (32 + reject_rows * (CELL_HEIGHT + 3 * CAPTION)) if rejects else 32
    sheet = Image.new("RGB", (sheet_w, header_h + len(rows) * row_h + reject_h + pad), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 6), title, fill=TEXT, font=font)
    for c, name in enumerate(headers):
        draw.text((pad + c * (cell_w + pad), 28), name, fill=TEXT, font=font)
    y = header_h
    for cells, caption in rows:
        for c, cell in enumerate(cells):
            sheet.paste(cell, (pad + c * (cell_w + pad), y))
        draw.text((pad, y + CELL_HEIGHT + 6), caption, fill=TEXT, font=font)
        y += row_h
    draw.text((pad, y + 8), f"rejects ({len(rejects)} shown)" if rejects else "rejects: none", fill=(255, 140, 120), font=font)
    y += 32
    for i, reject in enumerate(rejects):
        x = pad + (i % reject_cols) * (cell_w + pad)
        yy = y + (i // reject_cols) * (CELL_HEIGHT + 3 * CAPTION)
        thumb = _thumbnail(reject["file"], cell_w)
        if thumb is None:
            draw.rectangle([x, yy, x + cell_w, yy + CELL_HEIGHT], outline=(255, 140, 120))
            draw.text((x + 6, yy + CELL_HEIGHT // 2), "cannot be decoded", fill=(255, 140, 120), font=font)
        else:
            sheet.paste(thumb, (x, yy))
        name = reject["source_path"].rsplit("/", 1)[-1]
        draw.text((x, yy + CELL_HEIGHT + 4), _clip(name, cell_w), fill=TEXT, font=font)
        reason = textwrap.wrap(f"[{reject['stage']}] {reject['reason']}", max(8, cell_w // 6), max_lines=3, placeholder=" ...")
        for line_no, line in enumerate(reason):
            draw.text((x, yy + CELL_HEIGHT + 18 + 14 * line_no), _clip(line, cell_w), fill=(255, 140, 120), font=font)
    return sheet


def _clip(text: str, width_px: int) -> str:
    limit = max(8, width_px // 6)
    return text if len(text) <= limit else text[: limit - 1] + "..."
