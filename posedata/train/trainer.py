"""The one trainer every plugin runs on (DESIGN.md §5): accelerate for devices, mixed
precision and gradient accumulation; AdamW + constant-with-warm-up schedule + grad clipping;
checkpoints that resume; a loss log, a loss plot and a summary.

Data contract: `batches_factory(start, seed)` returns an iterable that yields collated
batches (dicts of tensors, `plugin.collate`'s output) forever, beginning at batch number
`start` of the stream for `seed`. `start` counts batches, not optimizer steps (each step
takes gradient_accumulation batches); a resume restarts the stream at the checkpoint's
`batches_seen`. The reader
builds it as `DataLoader(reader_pairs, batch_size, collate_fn=plugin.collate)`.

Run directory:
    config.json              everything the run was started with (a resume keeps the previous
                             one as config.prev-<step>.json)
    loss.csv, loss.png       step, loss, lr, samples/s; and the curve
    checkpoint-<step>/       model/ (save_pretrained, safetensors), optimizer.pt,
                             scheduler.pt (torch.save; read back with weights_only=True),
                             trainer_state.json (step, seed, batches_seen)
    summary.json             what `train` returns
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from posedata.train.plugin import Plugin

logger = logging.getLogger(__name__)

BatchesFactory = Callable[[int, int], Iterable[dict[str, torch.Tensor]]]
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LOSS_FIELDS = ["step", "loss", "lr", "samples_per_s"]


def train(
    plugin: Plugin,
    batches_factory: BatchesFactory,
    out_dir: str | os.PathLike,
    *,
    max_steps: int,
    batch_size: int,
    learning_rate: float | None = None,
    gradient_accumulation: int = 1,
    mixed_precision: str = "no",
    seed: int = 0,
    resume: bool | str | os.PathLike = False,
    checkpoint_every: int = 1000,
    log_every: int = 10,
    null_embeddings: Mapping[str, np.ndarray] | None = None,
    weight_decay: float | None = None,
    warmup_steps: int | None = None,
    max_grad_norm: float | None = None,
) -> dict[str, Any]:
    """Train `plugin` for `max_steps` optimizer steps; returns the summary dict.

    Hyper-parameters left as None take the plugin's `defaults`. `batch_size` is what the
    factory was built with (recorded; samples/s counts the batches actually seen).
    `resume`: False, True or "latest" (newest checkpoint in out_dir), or a checkpoint path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = plugin.defaults
    hp = {
        "learning_rate": d.learning_rate if learning_rate is None else learning_rate,
        "weight_decay": d.weight_decay if weight_decay is None else weight_decay,
        "warmup_steps": d.warmup_steps if warmup_steps is None else warmup_steps,
        "max_grad_norm": d.max_grad_norm if max_grad_norm is None else max_grad_norm,
    }
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation)
    main = accelerator.is_main_process
    set_seed(seed)
    plugin.set_null_embeddings(null_embeddings or {})

    model = plugin.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["learning_rate"], weight_decay=hp["weight_decay"])
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=hp["warmup_steps"])

    ckpt = find_checkpoint(out, resume)
    if ckpt is None and checkpoints(out):
        raise FileExistsError(f"{out} already holds a run (checkpoints); continue it with --resume latest, or start over with --overwrite")
    step = batches_seen = 0
    if ckpt is not None:
        model.load_state_dict(load_model_weights(ckpt / "model"))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        step, batches_seen = int(state["step"]), int(state["batches_seen"])
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True))
        logger.info("resuming from %s at step %d", ckpt, step)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()

    if main:
        write_config(out, plugin, accelerator.unwrap_model(model), ckpt, step, {
            "plugin": plugin.name, "weights": plugin.weights, "model": plugin.model_id,
            "max_steps": max_steps, "batch_size": batch_size, **hp,
            "gradient_accumulation": gradient_accumulation, "mixed_precision": mixed_precision,
            "seed": seed, "checkpoint_every": checkpoint_every, "log_every": log_every,
            "num_processes": accelerator.num_processes, "device": str(accelerator.device),
            "null_embeddings": {k: list(np.shape(v)) for k, v in (null_embeddings or {}).items()},
        })
        trim_loss_log(out / "loss.csv", step)

    data = iter(batches_factory(batches_seen, seed))
    generator = torch.Generator()
    start_step, t_start, samples, last_loss, last_saved = step, time.perf_counter(), 0, float("nan"), None
    bar = tqdm(total=max_steps, initial=step, desc=plugin.name, disable=not main, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30.0)
    with open(out / "loss.csv", "a", newline="") as log_file:
        log = csv.writer(log_file)
        if log_file.tell() == 0:
            log.writerow(LOSS_FIELDS)
        while step < max_steps:
            t0, losses, n = time.perf_counter(), [], 0
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            for _ in range(gradient_accumulation):
                batch = next(data, None)
                if batch is None:
                    raise RuntimeError("batches_factory must yield batches forever; it stopped")
                batch = {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                n += batch_len(batch)
                # The loss's randomness depends on (seed, batch number, process) only, so it
                # is the same whether or not the run was resumed.
                generator.manual_seed((seed * 1_000_003 + batches_seen) * accelerator.num_processes + accelerator.process_index)
                with accelerator.accumulate(model):
                    loss = plugin.loss(model, batch, generator)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), hp["max_grad_norm"])
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(accelerator.gather(loss.detach().float()).mean().item())
                batches_seen += 1
            step += 1
            n *= accelerator.num_processes
            samples += n
            last_loss = sum(losses) / len(losses)
            rate = n / max(time.perf_counter() - t0, 1e-9)
            if main:
                log.writerow([step, f"{last_loss:.6g}", f"{lr:.6g}", f"{rate:.2f}"])
                bar.update(1)
                if step % log_every == 0 or step == max_steps:
                    log_file.flush()
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}")
            if step % checkpoint_every == 0 or step == max_steps:
                last_saved = save_checkpoint(accelerator, model, optimizer, scheduler, out, step, seed, batches_seen)
                if main:
                    log_file.flush()
                    plot_loss(out / "loss.csv", out / "loss.png", title=f"{plugin.name} ({out.name})")
    bar.close()

    elapsed = time.perf_counter() - t_start
    if last_saved is None:  # nothing left to do (resumed at or past max_steps)
        last_saved = ckpt
    summary = {
        "plugin": plugin.name,
        "steps": step,
        "start_step": start_step,
        "final_loss": last_loss,
        "time_s": round(elapsed, 3),
        "samples_per_s": round(samples / elapsed, 3) if samples else 0.0,
        "checkpoint": str(last_saved) if last_saved else None,
        "out_dir": str(out),
    }
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if not (out / "loss.png").exists():
            plot_loss(out / "loss.csv", out / "loss.png", title=f"{plugin.name} ({out.name})")
        logger.info("done: %s", summary)
        print(f"[{plugin.name}] {step} steps (from {start_step}) in {elapsed:.1f}s, final loss {last_loss:.4f}, "
              f"{summary['samples_per_s']} samples/s; checkpoint {summary['checkpoint']}")
    accelerator.end_training()
    return summary


# ---- checkpoints --------------------------------------------------------------------------


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in a run directory, oldest first."""
    found = []
    for p in out.iterdir() if out.is_dir() else ():
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_checkpoint(out: Path, resume: bool | str | os.PathLike) -> Path | None:
    if resume is False or resume is None:
        return None
    if resume is True or str(resume) == "latest":
        found = checkpoints(out)
        if not found:
            logger.warning("resume requested but %s has no checkpoint: starting from step 0", out)
            return None
        return found[-1][1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (no trainer_state.json)")
    return path


def save_checkpoint(accelerator: Accelerator, model, optimizer, scheduler, out: Path, step: int, seed: int, batches_seen: int) -> Path:
    """Write checkpoint-<step>/ under a temporary name and rename it, so a crash never leaves
    a checkpoint that looks complete but is not."""
    final = out / f"checkpoint-{step}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = out / f".tmp-checkpoint-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        unwrapped = accelerator.unwrap_model(model)
        if hasattr(unwrapped, "save_pretrained"):
            unwrapped.save_pretrained(tmp / "model", safe_serialization=True)
        else:
            (tmp / "model").mkdir()
            save_file({k: v.contiguous() for k, v in unwrapped.state_dict().items()}, tmp / "model" / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        state = {"step": step, "seed": seed, "batches_seen": batches_seen, "epoch": 0}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a save_pretrained folder (one or several safetensors shards)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


# ---- logs ---------------------------------------------------------------------------------


def batch_len(batch: Mapping[str, Any]) -> int:
    for v in batch.values():
        if torch.is_tensor(v) and v.ndim:
            return int(v.shape[0])
    return 0


def write_config(out: Path, plugin: Plugin, model, ckpt: Path | None, step: int, settings: dict[str, Any]) -> None:
    import accelerate
    import diffusers

    path = out / "config.json"
    if ckpt is not None and path.exists():
        os.replace(path, out / f"config.prev-{step}.json")
    config = {
        **settings,
        "plugin_class": f"{type(plugin).__module__}:{type(plugin).__qualname__}",
        "plugin_defaults": plugin.defaults.__dict__,
        "resumed_from": str(ckpt) if ckpt else None,
        "start_step": step,
        "model_class": type(model).__name__,
        "model_config": dict(getattr(model, "config", {}) or {}),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "dataset": {k: plugin.card.get(k) for k in ("name", "resolution") if k in plugin.card},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "accelerate": accelerate.__version__},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path.write_text(json.dumps(config, indent=2, default=str) + "\n")


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
