"""The one trainer every plugin runs on (DESIGN.md §5): accelerate for devices, processes,
mixed precision and gradient accumulation; AdamW + constant-with-warm-up schedule + grad
clipping; optional EMA, gradient checkpointing and SDPA attention; checkpoints that resume
exactly; a loss log, a loss plot and a summary.

Data contract: `batches_factory(start, seed)` returns an iterable that yields collated
batches (dicts of tensors, `plugin.collate`'s output) forever, beginning at batch number
`start` of the stream for `seed` (this process's stream: with several processes each one
builds its own factory for its rank). `start` counts batches, not optimizer steps (each step
takes gradient_accumulation batches); a resume restarts the stream at the checkpoint's
`batches_seen`. `posedata.train.run.batches_factory` builds it over the reader, collating each
batch with a generator seeded by (seed, rank, batch number), so a batch is the same whether
or not the run was resumed and however many DataLoader workers made it.

Exact resume: a run stopped at a checkpoint and resumed gives bit-identical weights, EMA
and loss log to a run that never stopped (same device, same number of processes and
workers): the checkpoint holds the model, optimizer, scheduler, EMA, fp16 grad scaler, the
data position and every RNG state (python, numpy, torch, CUDA) of every process; the loss's
noise is drawn from a generator seeded by (seed, batch number, process). Tested on CPU
(tests/test_trainer.py, tests/test_accelerate_launch.py); on GPUs some kernels (atomic adds
in backward) are not deterministic unless `torch.use_deterministic_algorithms(True)`, so
there a resumed run equals the uninterrupted one only up to that noise.

Several processes: `accelerate launch --num_processes N -m posedata.cli train ...` (or
torchrun). Only the main process writes the run directory; every process writes its own RNG
state into the checkpoint. On a machine without CUDA the processes talk over gloo
(`use_cpu()`).

Run directory:
    config.json              everything the run was started with (a resume keeps the previous
                             one as config.prev-<step>.json)
    loss.csv, loss.png       step, loss, lr, samples/s; and the curve
    checkpoint-<step>/       model/ (save_pretrained, safetensors), ema/ (save_pretrained of
                             the EMA weights, when EMA is on), optimizer.pt, scheduler.pt,
                             scaler.pt (fp16 only; torch.save, read back with
                             weights_only=True), rng_state_<process>.safetensors,
                             trainer_state.json (step, seed, batches_seen, EMA counters, the
                             data stream's shape)
    summary.json             what `train` returns
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
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
ATTENTION_MODES = ("sdpa", "keep")
EMA_SCHEDULE = "diffusers EMAModel: decay_n = min(ema_decay, (1 + n) / (10 + n)), n = updates - 1 (0 at the first update: a copy)"
# what must match for a resume to continue the very same data stream
STREAM_KEYS = ("batch_size", "num_processes", "num_workers", "gradient_accumulation")


def use_cpu() -> bool:
    """Whether accelerate must be told to run on CPU: asked for (`ACCELERATE_USE_CPU`, what
    `accelerate launch --cpu` sets), or several processes on a machine without CUDA (then
    accelerate would otherwise start each one as a lone, non-distributed run)."""
    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flag or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())


def batch_seed(seed: int, rank: int, index: int, purpose: str = "collate") -> int:
    """A stable 63-bit seed for one batch of one process (not Python's `hash`, which is
    salted per interpreter for strings)."""
    digest = hashlib.blake2b(f"{purpose}:{seed}:{rank}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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
    ema_decay: float | None = None,
    gradient_checkpointing: bool = False,
    attention: str = "sdpa",
    run_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `plugin` for `max_steps` optimizer steps; returns the summary dict.

    Hyper-parameters left as None take the plugin's `defaults`. `batch_size` is what the
    factory was built with, per process (recorded; samples/s counts the batches actually
    seen). `resume`: False, True or "latest" (newest checkpoint in out_dir), or a checkpoint
    path. `ema_decay`: keep an exponential moving average of the weights (diffusers'
    EMAModel, `EMA_SCHEDULE`), saved as `ema/` in every checkpoint; None: no EMA.
    `gradient_checkpointing`: `model.enable_gradient_checkpointing()` (a ValueError if the
    model has none). `attention`: "sdpa" puts torch's scaled_dot_product_attention processor
    (`AttnProcessor2_0`) on every diffusers attention layer that has a plain processor;
    "keep" leaves what the model built. `run_info`: what the caller knows about the data
    (dataset URL, features, split, num_workers, ...), recorded in config.json as "data";
    its `num_workers` is part of the stream's shape checked on resume.
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
    out = Path(out_dir)
    d = plugin.defaults
    hp = {
        "learning_rate": d.learning_rate if learning_rate is None else learning_rate,
        "weight_decay": d.weight_decay if weight_decay is None else weight_decay,
        "warmup_steps": d.warmup_steps if warmup_steps is None else warmup_steps,
        "max_grad_norm": d.max_grad_norm if max_grad_norm is None else max_grad_norm,
    }
    run_info = dict(run_info or {})
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation, cpu=use_cpu())
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(seed)
    plugin.set_null_embeddings(null_embeddings or {})

    model = plugin.build_model()
    model_settings = configure_model(model, gradient_checkpointing=gradient_checkpointing, attention=attention)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["learning_rate"], weight_decay=hp["weight_decay"])
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=hp["warmup_steps"])
    stream = {"batch_size": batch_size, "num_processes": accelerator.num_processes, "num_workers": run_info.get("num_workers"),
              "gradient_accumulation": gradient_accumulation}

    ckpt = find_checkpoint(out, resume)
    if ckpt is None and checkpoints(out):
        raise FileExistsError(f"{out} already holds a run (checkpoints); continue it with --resume latest, or start over with --overwrite")
    step = batches_seen = 0
    state: dict[str, Any] = {}
    if ckpt is not None:
        model.load_state_dict(load_model_weights(ckpt / "model"))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        step, batches_seen = int(state["step"]), int(state["batches_seen"])
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True))
        if int(state.get("seed", seed)) != seed:
            logger.warning("resuming %s with seed %d; it ran with seed %s: the data order and noise change from here on", ckpt, seed, state["seed"])
        changed = {k: (state["stream"].get(k), stream[k]) for k in STREAM_KEYS if k in state.get("stream", {}) and state["stream"].get(k) != stream[k]}
        if changed:
            logger.warning("resuming %s with a different data stream (%s): training goes on, but not as the uninterrupted run would have",
                           ckpt, ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        logger.info("resuming from %s at step %d", ckpt, step)

    # EMA: kept by the main process only (every process holds the same weights).
    ema = None
    if ema_decay is not None and main:
        ema = make_ema(model, ema_decay, accelerator.device)
        if ckpt is not None and (ckpt / "ema").is_dir():
            load_ema(ema, model, ckpt / "ema", state.get("ema", {}))
        elif ckpt is not None:
            logger.warning("%s has no ema/: the EMA starts from the checkpoint's weights", ckpt)
    elif ema_decay is None and ckpt is not None and (ckpt / "ema").is_dir() and main:
        logger.warning("%s has EMA weights but ema_decay is not set: the EMA is not continued", ckpt)

    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if ckpt is not None and accelerator.scaler is not None and (ckpt / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(ckpt / "scaler.pt", map_location="cpu", weights_only=True))
    model.train()
    # plugins call the model (through DDP, so gradients are synchronised) and read its
    # attributes (model.dtype, model.normalise, ...) as if it were not wrapped
    loss_model = model if model is accelerator.unwrap_model(model) else WrappedModel(model, accelerator.unwrap_model(model))

    if main:
        write_config(out, plugin, accelerator.unwrap_model(model), ckpt, step, {
            "plugin": plugin.name, "weights": plugin.weights, "model": plugin.model_id,
            "max_steps": max_steps, "batch_size": batch_size,
            "global_batch_size": batch_size * gradient_accumulation * accelerator.num_processes, **hp,
            "gradient_accumulation": gradient_accumulation, "mixed_precision": mixed_precision,
            "seed": seed, "checkpoint_every": checkpoint_every, "log_every": log_every,
            "num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
            "device": str(accelerator.device),
            "ema": {"decay": ema_decay, "schedule": EMA_SCHEDULE, "implementation": "diffusers.training_utils.EMAModel"} if ema_decay is not None else None,
            **model_settings,
            "null_embeddings": {k: list(np.shape(v)) for k, v in (null_embeddings or {}).items()},
            "data": run_info,
        })
        trim_loss_log(out / "loss.csv", step)

    data = iter(batches_factory(batches_seen, seed))
    # After the data iterator exists (creating it may draw from the global RNG, as it did in
    # the uninterrupted run), put every RNG where the interrupted run left it.
    if ckpt is not None:
        restore_rng_state(ckpt, accelerator.process_index, accelerator.device)
    generator = torch.Generator()
    start_step, t_start, samples, last_loss, last_saved = step, time.perf_counter(), 0, float("nan"), None
    bar = tqdm(total=max_steps, initial=step, desc=plugin.name, disable=not main, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30.0)
    log_file = open(out / "loss.csv", "a", newline="") if main else None  # noqa: SIM115 (closed in the finally below)
    try:
        log = csv.writer(log_file) if log_file else None
        if log_file is not None and log_file.tell() == 0:
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
                    loss = plugin.loss(loss_model, batch, generator)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), hp["max_grad_norm"])
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(accelerator.gather(loss.detach().float()).mean().item())
                batches_seen += 1
            if ema is not None:
                ema.step(accelerator.unwrap_model(model).parameters())
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
                if main:
                    log_file.flush()
                last_saved = save_checkpoint(accelerator, model, optimizer, scheduler, out, step, seed, batches_seen,
                                             ema=ema, extra_state={"stream": stream})
                if main:
                    plot_loss(out / "loss.csv", out / "loss.png", title=f"{plugin.name} ({out.name})")
    finally:
        if log_file is not None:
            log_file.close()
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
        "ema": str(last_saved / "ema") if last_saved and (last_saved / "ema").is_dir() and ema_decay is not None else None,
        "out_dir": str(out),
    }
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if not (out / "loss.png").exists():
            plot_loss(out / "loss.csv", out / "loss.png", title=f"{plugin.name} ({out.name})")
        logger.info("done: %s", summary)
        print(f"[{plugin.name}] {step} steps (from {start_step}) in {elapsed:.1f}s, final loss {last_loss:.4f}, "
              f"{summary['samples_per_s']} samples/s; checkpoint {summary['checkpoint']}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


class WrappedModel:
    """What `plugin.loss` gets when the model is wrapped (DistributedDataParallel, compiled):
    calling it calls the wrapper; every attribute is the plain model's (`module` too)."""

    def __init__(self, wrapper: torch.nn.Module, module: torch.nn.Module):
        self.__dict__["_wrapper"] = wrapper
        self.__dict__["module"] = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapper(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["module"], name)


# ---- model settings -----------------------------------------------------------------------


def configure_model(model: torch.nn.Module, *, gradient_checkpointing: bool = False, attention: str = "sdpa") -> dict[str, Any]:
    """Gradient checkpointing and the attention implementation; returns what was set, for
    config.json."""
    if gradient_checkpointing:
        if not (hasattr(model, "enable_gradient_checkpointing") and getattr(model, "_supports_gradient_checkpointing", False)):
            raise ValueError(
                f"{type(model).__name__} does not support gradient checkpointing (it needs to be a diffusers ModelMixin whose class sets "
                "_supports_gradient_checkpointing = True and whose blocks check `self.gradient_checkpointing`); train without it"
            )
        try:
            model.enable_gradient_checkpointing()
        except ValueError as e:
            raise ValueError(f"{type(model).__name__}: cannot enable gradient checkpointing: {e}") from e
    return {"gradient_checkpointing": bool(gradient_checkpointing), "attention": set_attention(model, attention)}


def set_attention(model: torch.nn.Module, mode: str = "sdpa") -> dict[str, Any]:
    """mode "sdpa": every diffusers `Attention` whose processor is the plain `AttnProcessor`
    or `AttnProcessor2_0` gets `AttnProcessor2_0` (torch.nn.functional.
    scaled_dot_product_attention; diffusers' default under torch 2, set here explicitly so
    nothing else decides). Other processors (adapters, custom ones) are left alone. Returns
    {mode, processors: {class name: count}, sdp_backends}."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {mode!r}")
    from diffusers.models.attention_processor import (
        Attention,
        AttnProcessor,
        AttnProcessor2_0,
    )

    counts: Counter[str] = Counter()
    for module in model.modules():
        if isinstance(module, Attention):
            if mode == "sdpa" and type(module.processor) in (AttnProcessor, AttnProcessor2_0):
                module.set_processor(AttnProcessor2_0())
            counts[type(module.processor).__name__] += 1
    info: dict[str, Any] = {"mode": mode, "processors": dict(sorted(counts.items()))}
    if torch.cuda.is_available():
        info["sdp_backends"] = {"flash": torch.backends.cuda.flash_sdp_enabled(), "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                "math": torch.backends.cuda.math_sdp_enabled()}
    return info


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


# ---- logs ---------------------------------------------------------------------------------


def batch_len(batch: Mapping[str, Any]) -> int:
    for v in batch.values():
        if torch.is_tensor(v) and v.ndim:
            return int(v.shape[0])
    return 0


def write_config(out: Path, plugin: Plugin, model, ckpt: Path | None, step: int, settings: dict[str, Any]) -> None:
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
