"""Training state on disk: checkpoints (model, EMA, optimizer, scheduler, grad scaler, the
data position and every process's RNG state), written atomically and read back for an exact
resume. Used by `posedata.train.trainer`; nothing here knows about plugins.

checkpoint-<step>/
    model/                          save_pretrained (safetensors)
    ema/                            the EMA weights, same format (when EMA is on)
    optimizer.pt, scheduler.pt      torch.save of state dicts (read with weights_only=True)
    scaler.pt                       fp16 grad scaler (fp16 only)
    rng_state_<process>.safetensors python / numpy / torch (/ CUDA) RNG state
    trainer_state.json              step, seed, batches_seen, EMA counters, the stream's shape
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from posedata.errors import PosedataError

logger = logging.getLogger("posedata.train.trainer")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
EMA_SCHEDULE = "diffusers EMAModel: decay_n = min(ema_decay, (1 + n) / (10 + n)), n = updates - 1 (0 at the first update: a copy)"


# ---- the run folder -------------------------------------------------------------------------

# What a training run writes into its --out, and nothing else: `--overwrite` removes these.
RUN_FILES = ("config.json", "loss.csv", "loss.png", "summary.json")
RUN_ENTRY_RE = re.compile(r"^(\.tmp-)?checkpoint-\d+$|^config\.prev-\d+\.json$")


class RunFolderError(PosedataError, FileExistsError):
    """--out of `posedata train` holds something that is not a training run."""


def is_run_folder(out: Path) -> bool:
    """A folder a training run wrote: its config.json names a plugin class, or it holds a checkpoint."""
    if any(CHECKPOINT_RE.match(p.name) for p in out.iterdir()):
        return True
    try:
        return "plugin_class" in json.loads((out / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_run_folder(out: Path, overwrite: bool) -> None:
    """Before a run writes anything: --out must be new, empty or a training run (a run
    would replace a config.json or loss.csv of yours); with `overwrite`, remove only the
    run's own entries (RUN_FILES, checkpoints, earlier configs), never anything else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder; choose a folder (it is created if missing)")
    entries = sorted(out.iterdir())
    if entries and not is_run_folder(out):
        raise RunFolderError(
            f"--out {out} is not empty ({len(entries)} entries, e.g. {entries[0].name!r}) and holds no posedata training run: "
            "a run writes only into a new or empty folder or one a run made (--overwrite never deletes anything else); choose another --out"
        )
    if overwrite:
        for entry in entries:
            if entry.name in RUN_FILES and entry.is_file():
                entry.unlink()
            elif RUN_ENTRY_RE.match(entry.name) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif RUN_ENTRY_RE.match(entry.name):
                entry.unlink()


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


def save_weights(model: torch.nn.Module, folder: Path) -> None:
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder, safe_serialization=True)
    else:
        folder.mkdir(parents=True)
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")


def save_checkpoint(
    accelerator: Accelerator,
    model,
    optimizer,
    scheduler,
    out: Path,
    step: int,
    seed: int,
    batches_seen: int,
    ema=None,
    extra_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write checkpoint-<step>/ under a temporary name and rename it, so a crash never leaves
    a checkpoint that looks complete but is not. Every process adds its RNG state; the main
    process writes the rest."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    tmp.mkdir(exist_ok=True)  # a process on another node without a shared disk
    save_rng_state(tmp / f"rng_state_{accelerator.process_index}.safetensors", accelerator.device)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_weights(unwrapped, tmp / "model")
        if ema is not None:
            save_ema(ema, unwrapped, tmp / "ema")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        state = {"step": step, "seed": seed, "batches_seen": batches_seen, "epoch": 0, "num_processes": accelerator.num_processes,
                 **dict(extra_state or {})}
        if ema is not None:
            state["ema"] = {"decay": ema.decay, "optimization_step": ema.optimization_step}
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


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Model, optimizer and scheduler state from `ckpt`; returns its trainer_state.json."""
    model.load_state_dict(load_model_weights(ckpt / "model"))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True))
    return json.loads((ckpt / "trainer_state.json").read_text())


# ---- EMA ----------------------------------------------------------------------------------


def make_ema(model: torch.nn.Module, decay: float, device: torch.device):
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters(), decay=decay, foreach=torch.device(device).type == "cuda")
    ema.to(device)
    return ema


def load_ema(ema, model: torch.nn.Module, folder: Path, counters: Mapping[str, Any]) -> None:
    """Shadow weights from a checkpoint's ema/ (by parameter name), counters from
    trainer_state.json."""
    weights = load_model_weights(folder)
    names = [name for name, _ in model.named_parameters()]
    missing = [n for n in names if n not in weights]
    if missing:
        raise ValueError(f"{folder}: EMA weights lack {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    device = ema.shadow_params[0].device if ema.shadow_params else "cpu"
    ema.shadow_params = [weights[n].to(device=device, dtype=p.dtype) for n, p in zip(names, ema.shadow_params)]
    if "optimization_step" in counters:
        ema.optimization_step = int(counters["optimization_step"])


@torch.no_grad()
def save_ema(ema, model: torch.nn.Module, folder: Path) -> None:
    """The EMA weights in the model's own format (save_pretrained when it has one): swap them
    in, save, swap the trained weights back (bit-exact copies both ways)."""
    params = list(model.parameters())
    ema.store(params)
    ema.copy_to(params)
    try:
        save_weights(model, folder)
    finally:
        ema.restore(params)


# ---- RNG state ----------------------------------------------------------------------------


def save_rng_state(path: Path, device: torch.device) -> None:
    """python `random`, numpy's global RNG, torch's CPU RNG and (on CUDA) the device's RNG,
    as tensors + metadata in one safetensors file."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.device(device).type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    meta = {"python_version": str(version), "python_gauss": "" if gauss is None else float(gauss).hex(), "numpy_name": np_name,
            "numpy_pos": str(int(np_pos)), "numpy_has_gauss": str(int(np_has_gauss)), "numpy_gauss": float(np_gauss).hex()}
    save_file(tensors, path, metadata=meta)


def restore_rng_state(ckpt: Path, process_index: int, device: torch.device) -> bool:
    from safetensors import safe_open

    path = ckpt / f"rng_state_{process_index}.safetensors"
    if not path.is_file():
        logger.warning("%s has no RNG state for process %d: random draws outside the seeded generators differ from the uninterrupted run",
                       ckpt, process_index)
        return False
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    gauss = meta["python_gauss"]
    random.setstate((int(meta["python_version"]), tuple(int(v) for v in tensors["python"].tolist()), float.fromhex(gauss) if gauss else None))
    np.random.set_state((meta["numpy_name"], tensors["numpy_keys"].numpy().astype(np.uint32), int(meta["numpy_pos"]),
                         int(meta["numpy_has_gauss"]), float.fromhex(meta["numpy_gauss"])))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(tensors["torch_cuda"], device)
    return True
