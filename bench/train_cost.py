"""Training cost of each PCDMs stage: samples/s of one training step fed three ways, side by
side in one run, same model, same batch size, same device.

    python bench/train_cost.py                              # CPU, tiny models, all three stages
    python bench/train_cost.py --stages pcdm-prior --steps 20
    python bench/train_cost.py --device cuda --weights random --res 512x352 --mixed-precision bf16

(a) online: the official way. The loader reads the stored images (the base shard, JPEG
    decoded by the reader) and the keypoints; inside the step the frozen encoders run on them
    (PCDMs' preprocessing from posedata's extractors, on the device) and produce what the
    dataset would have stored: CLIP image_embeds (prior: source + target; inpaint: target),
    DINOv2 last_hidden_state of the source (inpaint, refine), VAE posteriors (inpaint: the
    [source | target] and [source | black] canvases; refine: the target and the coarse image,
    for which the target stands in as the plugin does). Then the plugin's collate (poses,
    skeleton renders, masks, dropout), loss, backward, clip, AdamW.
(b) cached: posedata's reader: `posedata.train.run.batches_factory` (PairStream + DataLoader +
    plugin.collate), exactly what `posedata train` runs; the step is the same minus the
    encoders.
(c) resident: one collated batch of (b), moved to the device once and reused: the step alone.

Ratios: speed-up = (b) / (a) samples/s; loader overhead = the extra time per sample the
loader costs over the step alone, from steps of (b) and (c) taken alternately after the
rounds (--steps x --repeats pairs): median (b - c) / median (c), which a burst of load on a
shared machine moves far less than the rounds' (c) / (b) - 1 (printed beside it) (goals from the issue: prior >= 15x, inpaint and
refine >= 1.5x, loader overhead <= 5%).

Every mode runs `--warmup` steps untimed, then `--repeats` rounds of `--steps` timed steps,
the three modes taking turns round by round; the median round is reported (each step ends
with `loss.item()`, as the trainer's does; CUDA is synchronised before the clock stops). The
DataLoader runs `--num-workers` workers in (a) and (b) alike (0: in the main process).

Without --shards it builds a small dataset from the fixture photos (`posedata build folder`,
the encoders in the same --weights mode, at --res) under bench/results/train_cost_data/ and
reuses it on the next run. The encoders of (a) are built in the same weights mode as the
dataset's features, so (a) and (b) see tensors of the same shapes.

At tiny size on CPU the encoders are tiny too (2-layer ViTs, a 2-level VAE at 64 x 48), so
the speed-ups measured there say nothing about the paper-size ratios: those need
`--weights random` at 512x352 on a GPU.

Writes bench/results/train_cost.json and bench/results/train_cost.md, and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "bench"))  # limits.py: the physical bounds

from report import git_commit, write_report  # noqa: E402

from posedata.extractors import create_extractor
from posedata.reader import Dataset, GroupStream, PairStream
from posedata.train import plugin_class
from posedata.train.run import batches_factory, collated_loader, load_null_embeddings

FIXTURES = Path(os.environ.get("POSEDATA_FIXTURES", REPO.parent / "shared" / "fixtures")) / "deepfashion"
RESULTS = REPO / "bench" / "results"
KEYPOINT_NEEDS = ("openpose", "keypoints_annotated")
GOALS = {"pcdm-prior": 15.0, "pcdm-inpaint": 1.5, "pcdm-refine": 1.5, "truepose": 1.5, "imagpose": 1.5, "reposedm": 1.5}
LOADER_OVERHEAD_GOAL = 0.05


# ---- online encoders -------------------------------------------------------------------------


class Encoders:
    """The frozen encoders of the official training step, built from posedata's extractors
    (same weights mode, same preprocessing), run on the device and kept there."""

    def __init__(self, specs: tuple[str, ...], weights: str, resolution: tuple[int, int], device: str, dtype: str):
        self.by_name = {}
        for spec in specs:
            extractor = create_extractor(spec, weights=weights, resolution=resolution, dtype=dtype)
            extractor.setup(device)
            self.by_name[spec.split(":")[0]] = extractor
        self.device = device

    @torch.no_grad()
    def clip(self, images: list[np.ndarray]) -> torch.Tensor:
        """CLIP image_embeds [N, D] (PCDMs: 512 x 512 square resize, CLIP processor)."""
        enc = self.by_name["clip"]
        pixels = enc.preprocess(images).to(self.device, enc._compute_dtype)
        return enc._model(pixel_values=pixels).image_embeds.float()

    @torch.no_grad()
    def dinov2(self, images: list[np.ndarray]) -> torch.Tensor:
        """DINOv2 last_hidden_state [N, 257, D] (same preprocessing as CLIP in PCDMs)."""
        enc = self.by_name["dinov2"]
        pixels = enc.preprocess(images).to(self.device, enc._compute_dtype)
        return enc._model(pixel_values=pixels).last_hidden_state.float()

    @torch.no_grad()
    def vae(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior (mean, std) [N, 4, H/8, W/8] of uint8 images ([-1, 1] pixels)."""
        enc = self.by_name["vae"]
        x = enc.preprocess(images).to(self.device)
        if enc._autocast_dtype is None:
            return enc._posterior(x)
        with torch.autocast(device_type=torch.device(self.device).type, dtype=enc._autocast_dtype):
            return enc._posterior(x)


def images(pairs: list[dict[str, Any]], side: str) -> list[np.ndarray]:
    return [p[side]["image"] for p in pairs]


def online_prior(enc: Encoders, pairs: list[dict[str, Any]], batch: dict[str, torch.Tensor]) -> None:
    # stage1_train_prior_model.py: image_encoder(clip_s_img), image_encoder(clip_t_img)
    batch["source_embeds"] = enc.clip(images(pairs, "source"))
    batch["target_embeds"] = enc.clip(images(pairs, "target"))


def online_inpaint(enc: Encoders, pairs: list[dict[str, Any]], batch: dict[str, torch.Tensor]) -> None:
    # stage2_train_inpaint_model.py: vae.encode([s | t]), vae.encode([s | black]),
    # image_encoder_p(source) (DINOv2), image_encoder_g(target).image_embeds (CLIP)
    src, tgt = images(pairs, "source"), images(pairs, "target")
    black = np.zeros_like(src[0])
    batch["latent_mean"], batch["latent_std"] = enc.vae([np.concatenate([s, t], axis=1) for s, t in zip(src, tgt)])
    batch["masked_mean"], batch["masked_std"] = enc.vae([np.concatenate([s, black], axis=1) for s in src])
    batch["source_tokens"] = enc.dinov2(src)
    batch["target_embeds"] = enc.clip(tgt)


def online_refine(enc: Encoders, pairs: list[dict[str, Any]], batch: dict[str, torch.Tensor]) -> None:
    # stage3_train_refined_model.py: vae.encode(target), vae.encode(gen_target) (the coarse
    # stage-2 output; the target stands in, as in the plugin), image_encoder_p(source)
    tgt = images(pairs, "target")
    batch["target_mean"], batch["target_std"] = enc.vae(tgt)
    batch["coarse_mean"], batch["coarse_std"] = enc.vae(tgt)
    batch["source_tokens"] = enc.dinov2(images(pairs, "source"))


def online_truepose(enc: Encoders, pairs: list[dict[str, Any]], batch: dict[str, torch.Tensor]) -> None:
    # TruePose (no public code; Sec. 4.1): z_s = phi(I_s) and the target latent (VAE), the
    # source's parsing map H_s [SCHP], CLIP on the box of every parsing class (eq. 4)
    from posedata.extractors.parsing import regions_from_labels

    src, tgt = images(pairs, "source"), images(pairs, "target")
    batch["source_mean"], batch["source_std"] = enc.vae(src)
    batch["latent_mean"], batch["latent_std"] = enc.vae(tgt)
    labels = enc.by_name["parsing"].label_maps(src)
    crops = [{"key": str(i), "image": image, "parsing": dict(zip(("classes.npy", "pixels.npy", "boxes.npy"), regions_from_labels(lab)))}
             for i, (image, lab) in enumerate(zip(src, labels))]
    tokens, valid = torch.zeros_like(batch["region_tokens"]), torch.zeros_like(batch["region_valid"])
    for i, row in enumerate(enc.by_name["clip_regions"](crops)):
        classes = torch.as_tensor(row["classes.npy"]).long()
        tokens[i, classes] = torch.as_tensor(row["embeds.npy"].astype(np.float32)).to(tokens.device)
        valid[i, classes] = True
    batch["labels"] = torch.as_tensor(np.stack(labels)).to(tokens.device)
    batch["region_tokens"], batch["region_valid"] = tokens, valid


def online_imagpose(enc: Encoders, groups: list[dict[str, Any]], batch: dict[str, torch.Tensor]) -> None:
    # train_stage1.py: vae.encode(2 x 2 canvas), vae.encode(masked canvas: target tiles black),
    # vae.encode(reference tile), image_enc(reference) (DINOv2); tiles padded as the plugin pads
    from posedata.train.imagpose_model import from_canvas

    tile_h, tile_w = batch["pose"].shape[-2] // 2, batch["pose"].shape[-1] // 2
    known = from_canvas(batch["mask"])[:, :, 0, 0, 0].bool().tolist()

    def canvas(tiles: list[np.ndarray]) -> np.ndarray:
        padded = [np.pad(t, ((0, tile_h - t.shape[0]), (0, tile_w - t.shape[1]), (0, 0))) for t in tiles]
        return np.concatenate([np.concatenate(padded[:2], axis=1), np.concatenate(padded[2:], axis=1)], axis=0)

    tiles = [[s["image"] for s in g["samples"]] for g in groups]
    batch["latent_mean"], batch["latent_std"] = enc.vae([canvas(t) for t in tiles])
    batch["masked_mean"], batch["masked_std"] = enc.vae([canvas([im if k else np.zeros_like(im) for im, k in zip(t, flags)]) for t, flags in zip(tiles, known)])
    reference = [t[int(r)] for t, r in zip(tiles, batch["reference"].tolist())]
    batch["reference_mean"], batch["reference_std"] = enc.vae(reference)
    batch["image_tokens"] = enc.dinov2(reference)


def online_reposedm(enc: Encoders, pairs: list[dict[str, Any]], batch: dict[str, torch.Tensor]) -> None:
    # RePoseDM (no public code; sec. 3.1-3.3): VAE on the source, the target and the target
    # pose image (the OpenPose skeleton, drawn from the keypoints as a dataloader would), and
    # HigherHRNet's backbone on that pose image (P_phi(P) of eq. 11)
    from posedata.render import draw_openpose

    src, tgt = images(pairs, "source"), images(pairs, "target")
    height, width = tgt[0].shape[:2]
    poses = [draw_openpose(np.asarray(p["target"]["openpose.keypoints"]), height, width) for p in pairs]
    batch["source_mean"], batch["source_std"] = enc.vae(src)
    batch["target_mean"], batch["target_std"] = enc.vae(tgt)
    keep = batch["keep"].bool()  # a dropped pair keeps the empty skeleton's latent
    mean, std = enc.vae(poses)
    batch["pose_mean"][keep], batch["pose_std"][keep] = mean[keep].to(batch["pose_mean"].dtype), std[keep].to(batch["pose_std"].dtype)
    hrnet = enc.by_name["higherhrnet"]
    with torch.no_grad():
        x = torch.as_tensor(np.stack(poses)).to(enc.device).permute(0, 3, 1, 2).float() / 255.0
        batch["pose_features"] = hrnet.net.pose_features(x).float()


@dataclass(frozen=True)
class Stage:
    """One row of the benchmark: the plugin, the dataset features it trains from, the
    encoders the official step runs, and how their outputs enter the plugin's batch."""

    plugin: str
    features: tuple[str, ...]
    encoders: tuple[str, ...]
    online: Callable[[Encoders, list[dict[str, Any]], dict[str, torch.Tensor]], None]
    options: tuple[tuple[str, Any], ...] = ()  # the plugin's train options (e.g. RePoseDM's guidance off)
    loader_needs: tuple[str, ...] = ()  # stored features the online loader reads besides pixels (keypoints)


STAGES = {
    "pcdm-prior": Stage("pcdm-prior", ("openpose", "clip"), ("clip",), online_prior),
    "pcdm-inpaint": Stage("pcdm-inpaint", ("openpose", "clip", "vae:sd21", "dinov2:giant"), ("vae:sd21", "dinov2:giant", "clip"), online_inpaint),
    "pcdm-refine": Stage("pcdm-refine", ("vae:sd21", "dinov2:giant"), ("vae:sd21", "dinov2:giant"), online_refine),
    "truepose": Stage("truepose", ("openpose", "vae:sd15", "parsing", "clip_regions"), ("vae:sd15", "parsing", "clip_regions"), online_truepose),
    "imagpose": Stage("imagpose", ("openpose:full", "vae:sd15", "dinov2:base"), ("vae:sd15", "dinov2:base"), online_imagpose),
    # with the pose guidance (decoder + HigherHRNet forward / backward in every step), and
    # without it (ablation B2): the difference is the guidance's own cost
    "reposedm": Stage("reposedm", ("openpose", "vae:sd15", "higherhrnet", "pose_latent:sd15"), ("vae:sd15", "higherhrnet"), online_reposedm,
                      loader_needs=("openpose",)),
    "reposedm-b2": Stage("reposedm", ("openpose", "vae:sd15", "higherhrnet", "pose_latent:sd15"), ("vae:sd15", "higherhrnet"), online_reposedm,
                         options=(("pose_guidance", 0.0),), loader_needs=("openpose",)),
}


# ---- the step --------------------------------------------------------------------------------


def keep_pairs(chunk: list[dict[str, Any]], generator: torch.Generator | None = None) -> list[dict[str, Any]]:
    """The online loader's 'collate': the pairs as they are (images + keypoints)."""
    return chunk


class ListCollate:
    """A stand-in plugin for `collated_loader` that hands the pairs through."""

    collate = staticmethod(keep_pairs)


def placeholders(dataset: Dataset, plugin) -> dict[str, np.ndarray]:
    """Zero arrays for the stored encoder outputs the plugin's collate stacks (the online way
    overwrites them with the encoders' outputs on the device): its needs except keypoints."""
    out = {}
    for need in plugin.needs:
        names = (need,) if isinstance(need, str) else need
        if any(n.split(":")[0] in KEYPOINT_NEEDS for n in names):
            continue
        column = dataset.column(need)
        outputs = dataset.card["features"][column.folder]["outputs"]
        height, width = dataset.resolution
        for suffix in column.suffixes:
            # symbolic dims: the stored H / W, and no rows for a per-image count (M regions)
            shape = [{"H": height, "W": width}.get(d, 0) if isinstance(d, str) else d for d in outputs[suffix]["shape"]]
            out[f"{column.alias}.{suffix.rsplit('.', 1)[0]}"] = np.zeros(shape, np.float16)
    return out


def keypoint_needs(plugin) -> tuple:
    return tuple(n for n in plugin.needs if any(x.split(":")[0] in KEYPOINT_NEEDS for x in ((n,) if isinstance(n, str) else n)))


def to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Step:
    """loss, backward, grad clip, AdamW, zero_grad, loss.item(): the trainer's step without
    accelerate's bookkeeping."""

    def __init__(self, plugin, model: torch.nn.Module, device: str, mixed_precision: str):
        self.plugin, self.model, self.device = plugin, model, device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=plugin.defaults.learning_rate, weight_decay=plugin.defaults.weight_decay)
        self.generator = torch.Generator()
        self.count = 0
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
        self.autocast = (lambda: torch.autocast(device_type=torch.device(device).type, dtype=dtype)) if dtype else contextlib.nullcontext

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        self.generator.manual_seed(self.count)
        self.count += 1
        with self.autocast():
            loss = self.plugin.loss(self.model, batch, self.generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.plugin.defaults.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(run_one: Callable[[], float], warmup: int, steps: int, device: str) -> dict[str, Any]:
    for _ in range(warmup):
        run_one()
    sync(device)
    losses, step_times = [], []
    t0 = last = time.perf_counter()
    for _ in range(steps):
        losses.append(run_one())  # ends with loss.item(): the device is synchronised
        now = time.perf_counter()
        step_times.append(now - last)
        last = now
    sync(device)
    elapsed = time.perf_counter() - t0
    return {"time_s": elapsed, "step_s": elapsed / steps, "step_times_s": step_times, "final_loss": losses[-1],
            "finite": bool(np.isfinite(losses).all())}


def bench_stage(stage: Stage, dataset: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    plugin = plugin_class(stage.plugin)(dataset.card, weights=args.weights, **dict(stage.options))
    plugin.set_null_embeddings(load_null_embeddings(dataset, plugin))
    torch.manual_seed(0)
    model = plugin.build_model().to(device).train()
    step = Step(plugin, model, device, args.mixed_precision)
    bs, seed = args.batch_size, 0
    label = stage.plugin + "".join(f" {k}={v}" for k, v in stage.options)
    result: dict[str, Any] = {"plugin": label, "batch_size": bs, "model_parameters": sum(p.numel() for p in model.parameters()),
                              "encoders": list(stage.encoders), "modes": {}}

    # (a) online: images + keypoints from the reader, encoders inside the step
    encoders = Encoders(stage.encoders, args.weights, dataset.resolution, device, dataset.card["build"].get("dtype", "fp16"))
    # clip_regions runs the clip extractor it composes
    # (HigherHRNet keeps its network as `net`)
    result["encoder_parameters"] = {n: sum(p.numel() for p in (getattr(getattr(e, "clip", e), "_model", None) or e.net).parameters())
                                    for n, e in encoders.by_name.items()}
    fill = placeholders(dataset, plugin)
    groups = getattr(plugin, "stream", "pairs") == "groups"  # IMAGPose: groups of four images
    pixels = (GroupStream if groups else PairStream)(dataset, args.split, keypoint_needs(plugin) + stage.loader_needs, pixels=True, seed=seed)
    online_pairs = collated_loader(pixels, ListCollate, bs, args.num_workers, seed)
    wait = [0.0]

    def online() -> float:
        t = time.perf_counter()
        pairs = next(online_pairs)
        wait[0] += time.perf_counter() - t
        if groups:
            pairs = [{**g, "samples": [{**x, **fill} for x in g["samples"]]} for g in pairs]
        else:
            pairs = [{"source": {**p["source"], **fill}, "target": {**p["target"], **fill}} for p in pairs]
        batch = to_device(plugin.collate(pairs, torch.Generator().manual_seed(step.count)), device)
        stage.online(encoders, pairs, batch)
        return step(batch)

    # (b) cached: posedata's reader, as `posedata train` runs it
    cached_batches = batches_factory(dataset, plugin, args.split, bs, args.num_workers)(0, seed)

    def cached() -> float:
        t = time.perf_counter()
        batch = next(cached_batches)
        wait[0] += time.perf_counter() - t
        return step(to_device(batch, device))

    # (c) resident: one collated batch on the device, reused
    resident_batch = to_device(next(batches_factory(dataset, plugin, args.split, bs, 0)(0, seed)), device)

    def resident() -> float:
        return step(resident_batch)

    # Rounds of (a), (b), (c) in turn, so that a busy machine slows all three alike; the
    # median round counts.
    modes = (("a_online", online), ("b_cached", cached), ("c_resident", resident))
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name, _ in modes}
    for round_ in range(args.repeats):
        for name, fn in modes:
            wait[0] = 0.0
            r = timed(fn, args.warmup if round_ == 0 else 0, args.steps, device)
            r["samples_per_s"] = args.steps * bs / r["time_s"]
            if name != "c_resident":
                r["loader_wait_s"] = wait[0]  # includes the warm-up steps' waits
            rounds[name].append(r)
            print(f"  round {round_ + 1}: {stage.plugin} {name}: {r['samples_per_s']:.2f} samples/s ({r['step_s'] * 1000:.1f} ms/step)", flush=True)
    for name, rs in rounds.items():
        rates = [r["samples_per_s"] for r in rs]
        median_step = float(np.median([t for r in rs for t in r["step_times_s"]]))
        result["modes"][name] = {"samples_per_s": float(np.median(rates)), "median_step_s": median_step, "rounds": rs,
                                 "all_finite": all(r["finite"] for r in rs)}
    encoders.by_name.clear()  # free the encoders before the next stage
    a, b, c = (result["modes"][m]["samples_per_s"] for m in ("a_online", "b_cached", "c_resident"))
    result["speedup_cached_vs_online"] = b / a
    # The overhead is a small difference of two times, so a burst of load on a shared
    # machine during one round moves the median-round figure by several percent. Steps of
    # (b) and (c) taken alternately, one each, see the same load: the median of their
    # differences over the median (c) step is the steadier estimate.
    pairs = args.steps * args.repeats
    differences, resident_steps = [], []
    for _ in range(pairs):
        t0 = time.perf_counter()
        cached()
        t1 = time.perf_counter()
        resident()
        t2 = time.perf_counter()
        differences.append((t1 - t0) - (t2 - t1))
        resident_steps.append(t2 - t1)
    result["loader_overhead"] = float(np.median(differences) / np.median(resident_steps))
    result["loader_overhead_paired_steps"] = pairs
    result["loader_overhead_rounds"] = c / b - 1.0
    result["goal_speedup"] = GOALS.get(stage.plugin)
    if torch.device(device).type == "cuda":
        from limits import load_limits, training_bound_of

        limits = load_limits()
        for mode, key in (("online", "a_online"), ("cached", "b_cached")):
            bound = training_bound_of(stage.plugin, mode, torch.cuda.get_device_name(), limits)
            if bound:
                result["modes"][key]["gpu_bound"] = {"gpu": bound[0], "samples_per_s": bound[1], "fraction": result["modes"][key]["samples_per_s"] / bound[1]}
    return result


# ---- dataset ---------------------------------------------------------------------------------


def build_dataset(args: argparse.Namespace, features: list[str]) -> str:
    out = RESULTS / "train_cost_data" / f"{args.weights}-{args.res}-{'+'.join(sorted(f.replace(':', '-') for f in features))}"
    if (out / "dataset.json").is_file():
        return str(out)
    if not FIXTURES.is_dir():
        raise SystemExit(f"no fixture photos at {FIXTURES} (set POSEDATA_FIXTURES) and no --shards")
    cmd = [sys.executable, "-m", "posedata.cli", "build", "folder", "--root", str(FIXTURES), "--out", str(out), "--res", args.res,
           "--weights", args.weights, "--executor", "local", "--features", ",".join(features)]
    print("building:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
    return str(out)


# ---- report ----------------------------------------------------------------------------------


def environment(argv: list[str], device: str) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    env = {
        "command": "python bench/train_cost.py " + " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": git_commit(),
    }
    try:
        env["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def markdown(report: dict[str, Any]) -> str:
    env, a = report["environment"], report["args"]
    lines = [
        f"- command: `{env['command']}`",
        f"- date: {env['date']}; git {env['git_commit']}",
        f"- machine: {env['machine']}" + (f"; load average {env['load_average']}" if "load_average" in env else "") + (f"; {env['gpu']}" if "gpu" in env else ""),
        (f"- torch {env['torch']}; device {a['device']}, weights {a['weights']}, {a['res']}, mixed precision {a['mixed_precision']}, "
         f"batch {a['batch_size']}, {a['warmup']} warm-up + {a['repeats']} rounds of {a['steps']} timed steps per mode (median round), "
         f"{a['num_workers']} DataLoader workers"),
        "",
        "| stage | model params | encoders (params) | (a) online samples/s | (b) cached samples/s | (c) resident samples/s | speed-up (b)/(a) | goal | loader overhead: paired steps, median (b - c) / median c | (median rounds: (c)/(b) - 1) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["stages"]:
        m = r["modes"]
        encoders = ", ".join(f"{n} {p / 1e6:.3g}M" for n, p in r["encoder_parameters"].items())
        lines.append(
            f"| {r['plugin']} | {r['model_parameters'] / 1e6:.3g}M | {encoders} | {m['a_online']['samples_per_s']:.1f} | {m['b_cached']['samples_per_s']:.1f} | "
            f"{m['c_resident']['samples_per_s']:.1f} | {r['speedup_cached_vs_online']:.2f}x | >= {r['goal_speedup']}x | {100 * r['loader_overhead']:+.1f}% | "
            f"({100 * r['loader_overhead_rounds']:+.1f}%) |"
        )
    bounded = [(r, m) for r in report["stages"] for m in ("a_online", "b_cached") if r["modes"][m].get("gpu_bound")]
    if bounded:
        lines += ["", "Against the physical bound (`bench/limits.py`: the paper-size step at the plugin's paper batch; compare at `--weights random --res 512x352` and that batch):", ""]
        for r, m in bounded:
            b = r["modes"][m]["gpu_bound"]
            lines.append(f"- {r['plugin']} {m[2:]}: {r['modes'][m]['samples_per_s']:.1f} samples/s = **{100 * b['fraction']:.1f} %** of the {b['gpu']} bound {b['samples_per_s']:,.0f} samples/s")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--weights", choices=("tiny", "random"), default="tiny", help="tiny: tiny models (CPU); random: paper size, random init (GPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--res", default=None, help="stored resolution of the built dataset (default 64x48 tiny, 512x352 random)")
    parser.add_argument("--shards", default=None, help="an existing dataset with the stages' features (built in the same weights mode)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (a), (b), (c); the median round is reported")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers in (a) and (b)")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's); 1 is steadier on a shared machine")
    parser.add_argument("--out", default=str(RESULTS / "train_cost.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.res = args.res or ("64x48" if args.weights == "tiny" else "512x352")
    stages = [STAGES[s.strip()] for s in args.stages.split(",") if s.strip()]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but CUDA is not available")

    features = sorted({f for s in stages for f in s.features})
    shards = args.shards or build_dataset(args, features)
    dataset = Dataset(shards)
    report: dict[str, Any] = {"environment": environment(argv, args.device), "args": vars(args), "dataset": shards, "stages": []}
    for stage in stages:
        print(f"{stage.plugin}:", flush=True)
        report["stages"].append(bench_stage(stage, dataset, args))
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
    report["notes"] = {
        "speedup": "(b) cached / (a) online samples/s",
        "loader_overhead": "steps of (b) cached and (c) resident taken alternately (steps x repeats pairs): median of (b - c) / median of c, the extra "
                           "time per sample the reader + collate add over the step alone (loader_overhead_rounds: (c)/(b) - 1 from the median "
                           "rounds' samples/s, noisier)",
        "goals": {"speedup": GOALS, "loader_overhead": LOADER_OVERHEAD_GOAL},
        "tiny": "at --weights tiny the encoders are tiny too: the speed-up is not representative of paper size",
    }
    write_report(args.out, report, markdown)
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")


if __name__ == "__main__":
    main()
