"""The one trainer every plugin runs on (docs/design.md, "Plugins"): accelerate for devices, processes,
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

Settings: one `TrainConfig` (posedata.train.config); the plugin's preset gives the
defaults, keyword arguments of `train` replace fields.

Run directory:
    config.json              everything the run was started with (a resume keeps the previous
                             one as config.prev-<step>.json)       (posedata.train.logs)
    loss.csv, loss.png       step, loss, lr, samples/s; and the curve (posedata.train.logs)
    checkpoint-<step>/       see posedata.train.checkpoint
    summary.json             what `train` returns
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
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
from tqdm.auto import tqdm

from posedata.train.checkpoint import (
    EMA_SCHEDULE,
    checkpoints,
    find_checkpoint,
    load_checkpoint,
    load_ema,
    load_model_weights,
    make_ema,
    restore_rng_state,
    save_checkpoint,
)
from posedata.train.config import ATTENTION_MODES, TrainConfig
from posedata.train.logs import LossLog, plot_loss, write_config
from posedata.train.plugin import Plugin

__all__ = ["TrainConfig", "batch_seed", "checkpoints", "configure_model", "find_checkpoint", "load_model_weights", "train", "use_cpu"]

logger = logging.getLogger(__name__)

BatchesFactory = Callable[[int, int], Iterable[dict[str, torch.Tensor]]]
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
    config: TrainConfig | None = None,
    *,
    resume: bool | str | os.PathLike = False,
    null_embeddings: Mapping[str, np.ndarray] | None = None,
    run_info: Mapping[str, Any] | None = None,
    **changes: Any,
) -> dict[str, Any]:
    """Train `plugin` for `config.max_steps` optimizer steps; returns the summary dict.

    `config` defaults to the plugin's preset (`plugin.defaults`); `changes` replace fields
    of it (`max_steps=40, learning_rate=1e-3`, ...). `config.batch_size` must be what the
    factory was built with, per process (recorded; samples/s counts the batches actually
    seen). `resume`: False, True or "latest" (newest checkpoint in out_dir), or a checkpoint
    path. `run_info`: what the caller knows about the data (dataset URL, features, split,
    num_workers, ...), recorded in config.json as "data"; its `num_workers` is part of the
    stream's shape checked on resume.
    """
    cfg = dataclasses.replace(config or plugin.defaults, **changes)
    out = Path(out_dir)
    run_info = dict(run_info or {})
    if cfg.warmup_steps > cfg.max_steps:
        logger.warning("max_steps %d is below the warm-up (%d steps): the learning rate only climbs to %.3g of %g; lower --warmup-steps",
                       cfg.max_steps, cfg.warmup_steps, cfg.max_steps / cfg.warmup_steps, cfg.learning_rate)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation, cpu=use_cpu())
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    plugin.set_null_embeddings(null_embeddings or {})

    model = plugin.build_model()
    model_settings = configure_model(model, gradient_checkpointing=cfg.gradient_checkpointing, attention=cfg.attention)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max(cfg.max_steps, 1))
    stream = {"batch_size": cfg.batch_size, "num_processes": accelerator.num_processes, "num_workers": run_info.get("num_workers"),
              "gradient_accumulation": cfg.gradient_accumulation}

    ckpt = find_checkpoint(out, resume)
    if ckpt is None and checkpoints(out):
        raise FileExistsError(f"{out} already holds a run (checkpoints); continue it with --resume latest, or start over with --overwrite")
    step = batches_seen = 0
    state: dict[str, Any] = {}
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        step, batches_seen = int(state["step"]), int(state["batches_seen"])
        check_resume(ckpt, state, cfg.seed, stream)
    ema = setup_ema(model, cfg.ema_decay, ckpt, state, accelerator) if main else None

    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if ckpt is not None and accelerator.scaler is not None and (ckpt / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(ckpt / "scaler.pt", map_location="cpu", weights_only=True))
    model.train()
    # plugins call the model (through DDP, so gradients are synchronised) and read its
    # attributes (model.dtype, model.normalise, ...) as if it were not wrapped
    plain = accelerator.unwrap_model(model)
    loss_model = model if model is plain else WrappedModel(model, plain)

    log = None
    if main:
        write_config(out, plugin, plain, ckpt, step, {
            "plugin": plugin.name, "weights": plugin.weights, "model": plugin.model_id, **cfg.to_dict(),
            "global_batch_size": cfg.batch_size * cfg.gradient_accumulation * accelerator.num_processes,
            "num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
            "device": str(accelerator.device),
            "ema": {"decay": cfg.ema_decay, "schedule": EMA_SCHEDULE, "implementation": "diffusers.training_utils.EMAModel"} if cfg.ema_decay else None,
            **model_settings,
            "null_embeddings": {k: list(np.shape(v)) for k, v in (null_embeddings or {}).items()},
            # whether the reader decodes images is the plugin's once the model is built (a
            # loaded RePoseDM model can switch it on: rpa_warp "pixels")
            "data": {**run_info, "pixels": plugin.needs_pixels} if "pixels" in run_info else run_info,
        })
        log = LossLog(out / "loss.csv", step)

    data = iter(batches_factory(batches_seen, cfg.seed))
    # After the data iterator exists (creating it may draw from the global RNG, as it did in
    # the uninterrupted run), put every RNG where the interrupted run left it.
    if ckpt is not None:
        restore_rng_state(ckpt, accelerator.process_index, accelerator.device)
    generator = torch.Generator()
    start_step, t_start, samples, last_loss, last_saved = step, time.perf_counter(), 0, float("nan"), None
    bar = tqdm(total=cfg.max_steps, initial=step, desc=plugin.name, disable=not main, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30.0)
    try:
        while step < cfg.max_steps:
            t0, losses, n = time.perf_counter(), [], 0
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            for _ in range(cfg.gradient_accumulation):
                batch = next(data, None)
                if batch is None:
                    raise RuntimeError("batches_factory must yield batches forever; it stopped")
                batch = {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                n += batch_len(batch)
                # The loss's randomness depends on (seed, batch number, process) only, so it
                # is the same whether or not the run was resumed.
                generator.manual_seed((cfg.seed * 1_000_003 + batches_seen) * accelerator.num_processes + accelerator.process_index)
                with accelerator.accumulate(model):
                    loss = plugin.loss(loss_model, batch, generator)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(accelerator.gather(loss.detach().float()).mean().item())
                batches_seen += 1
            if ema is not None:
                ema.step(plain.parameters())
            step += 1
            n *= accelerator.num_processes
            samples += n
            last_loss = sum(losses) / len(losses)
            rate = n / max(time.perf_counter() - t0, 1e-9)
            if log is not None:
                log.write(step, last_loss, lr, rate)
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    log.flush()
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                if log is not None:
                    log.flush()
                last_saved = save_checkpoint(accelerator, model, optimizer, scheduler, out, step, cfg.seed, batches_seen,
                                             ema=ema, extra_state={"stream": stream})
                if main:
                    plot_loss(out / "loss.csv", out / "loss.png", title=f"{plugin.name} ({out.name})")
    finally:
        if log is not None:
            log.close()
    bar.close()

    elapsed = time.perf_counter() - t_start
    last_saved = last_saved or ckpt  # None: nothing left to do (resumed at or past max_steps)
    summary = {
        "plugin": plugin.name,
        "steps": step,
        "start_step": start_step,
        "final_loss": last_loss,
        "time_s": round(elapsed, 3),
        "samples_per_s": round(samples / elapsed, 3) if samples else 0.0,
        "checkpoint": str(last_saved) if last_saved else None,
        "ema": str(last_saved / "ema") if last_saved and (last_saved / "ema").is_dir() and cfg.ema_decay is not None else None,
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


def check_resume(ckpt: Path, state: Mapping[str, Any], seed: int, stream: Mapping[str, Any]) -> None:
    """Warn when a resume will not continue the interrupted run's data and noise exactly."""
    if int(state.get("seed", seed)) != seed:
        logger.warning("resuming %s with seed %d; it ran with seed %s: the data order and noise change from here on", ckpt, seed, state["seed"])
    before = state.get("stream", {})
    changed = {k: (before.get(k), stream[k]) for k in STREAM_KEYS if k in before and before.get(k) != stream[k]}
    if changed:
        logger.warning("resuming %s with a different data stream (%s): training goes on, but not as the uninterrupted run would have",
                       ckpt, ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    logger.info("resuming from %s at step %d", ckpt, int(state["step"]))


def setup_ema(model: torch.nn.Module, decay: float | None, ckpt: Path | None, state: Mapping[str, Any], accelerator: Accelerator):
    """The EMA of the main process (every process holds the same weights), continued from
    the checkpoint when it has one."""
    if decay is None:
        if ckpt is not None and (ckpt / "ema").is_dir():
            logger.warning("%s has EMA weights but ema_decay is not set: the EMA is not continued", ckpt)
        return None
    ema = make_ema(model, decay, accelerator.device)
    if ckpt is not None and (ckpt / "ema").is_dir():
        load_ema(ema, model, ckpt / "ema", state.get("ema", {}))
    elif ckpt is not None:
        logger.warning("%s has no ema/: the EMA starts from the checkpoint's weights", ckpt)
    return ema


def batch_len(batch: Mapping[str, Any]) -> int:
    for v in batch.values():
        if torch.is_tensor(v) and v.ndim:
            return int(v.shape[0])
    return 0


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
