"""The physical limit, counted: FLOPs, bytes and memory per sample of every extractor and of
every plugin's training step at paper size, and the images/s and samples/s an H100 or H200
could at most reach (a script to run by hand, not a test; no GPU needed).

    python bench/limits.py                      # 512x352, every default feature and every plugin (~15 min on 2 shared cores)
    python bench/limits.py --res 256x176
    python bench/limits.py --render bench/results/limits.json

What it does:

1. **Extraction.** Builds a small dataset of the fixture photos (3 DeepFashion-size photos,
   one group) with `--weights random` (every model at its real size, seeded random init)
   at `--res`: `posedata build` with the first feature, then `posedata extend` with each
   other one in dependency order (one model in memory at a time), the local executor,
   in this process. Every extractor's pass over the photos runs under
   `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention: what a
   GPU's tensor cores do; elementwise work and the CPU post-processing are not FLOPs here)
   and `PeakMemory` (the peak of the tensors it allocates: activations). Parameters are
   counted from the extractor's modules. The FLOPs are those of the extractor's own
   `__call__` (its preprocessing, scales, crops), per image. Random weights change nothing
   in the count except where the work depends on the output: `clip_regions` runs CLIP on
   one crop per parsing class found (the count is per image at the number of regions the
   random parser produced, printed; and per region).
2. **Training.** For every registered plugin: the paper-size model (`--weights random`, the
   `paper` preset) on the meta device in bf16, one batch from the real reader and collate
   (`posedata.train.run.batches_factory`) over the dataset of step 1, moved to the meta
   device, and `plugin.loss` + `backward()` under FlopCounterMode and PeakMemory: FLOPs per
   sample of the step (forward + backward; the optimizer's elementwise update is not
   FLOPs, it is memory traffic, below) and saved-activation bytes per sample (bf16).
   *Online* = that step plus the frozen encoders the official code runs inside each step
   (table ONLINE, with its sources), at their extraction FLOPs per image.
3. **Bytes.** Read per sample from the dataset: the tar members (512-byte headers and
   padding included) of the features a plugin reads, times the images per sample (2 for a
   pair, 4 for IMAGPose's groups), from the dataset of step 1 (fp16 storage). Online reads
   the stored JPEG instead. Written per image by extraction: the feature's members.
4. **Bounds.** images/s (extraction) = peak / FLOPs per image (compute roofline; the
   weights, read once per batch, and the image in and features out are far below the HBM
   bandwidth's share, printed). samples/s (training) at the plugin's paper batch B =
   B / max(B x FLOPs / peak, bytes / bandwidth), bytes = the AdamW update (28 bytes per
   trained parameter: read fp32 weight, grad, two moments; write weight and moments) +
   the saved activations written in the forward and read in the backward (2 x bytes x B).
   Both are upper bounds: no kernel reaches peak.

GPUs (dense, i.e. without 2:4 sparsity; NVIDIA's data sheets, whose headline tensor figures
are with sparsity, i.e. twice these):

- H100 SXM5 80 GB: BF16/FP16 tensor 989.4 TFLOPS, HBM3 3.35 TB/s
- H100 PCIe 80 GB: BF16/FP16 tensor 756 TFLOPS, HBM2e 2.0 TB/s
- H200 SXM 141 GB: BF16/FP16 tensor 989.4 TFLOPS, HBM3e 4.8 TB/s

Writes bench/results/limits.json (every count) and bench/results/limits.md (the tables);
`bench/extraction.py --device cuda` and `bench/train_cost.py --device cuda` read the JSON
and print their measured rates as a fraction of these bounds (`extraction_bound_of`,
`training_bound_of`): the bounds are for the paper resolution and batch, so compare runs at
512x352 (and, for training, `--weights random` at the plugin's paper batch size).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from report import git_commit, render_earlier, write_report  # bench/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

FIXTURES = Path(os.environ.get("POSEDATA_FIXTURES", REPO.parent / "shared" / "fixtures")) / "deepfashion"
RESULTS = REPO / "bench" / "results"
LIMITS_JSON = RESULTS / "limits.json"

# name: (dense BF16 tensor FLOP/s, HBM bytes/s, memory bytes, how torch.cuda.get_device_name() names it)
GPUS: dict[str, dict[str, Any]] = {
    "H100 SXM": {"flops": 989.4e12, "bandwidth": 3.35e12, "memory": 80e9, "names": ("H100 80GB HBM3", "H100 SXM")},
    "H100 PCIe": {"flops": 756e12, "bandwidth": 2.0e12, "memory": 80e9, "names": ("H100 PCIe",)},
    "H200": {"flops": 989.4e12, "bandwidth": 4.8e12, "memory": 141e9, "names": ("H200",)},
}
GPU_SOURCE = "NVIDIA H100 and H200 Tensor Core GPU data sheets; dense = the sheets' 'with sparsity' tensor figures halved"

# clip_regions runs CLIP once per parsing class present. A full-body DeepFashion photo shows
# about 8 of the ATR classes (hair, face, upper clothes, pants or skirt, arms, legs, shoes):
# our guess, stated in the table; the random-weight parser of the run finds more.
REGIONS = 8.0

# AdamW with fp32 master weights: read weight, grad, m, v (16 B), write weight, m, v (12 B).
ADAMW_BYTES_PER_PARAM = 28

# The frozen encoders the official training code runs inside every step, per training
# sample (a pair; IMAGPose: a group of four), as (feature spec, images' worth of pixels):
# the same encoders as bench/train_cost.py's (a) online mode.
ONLINE: dict[str, dict[str, Any]] = {
    "pcdm-prior": {
        "encoders": [("clip", 2)],
        "source": "PCDMs stage1_train_prior_model.py: image_encoder on the source and the target image",
    },
    "pcdm-inpaint": {
        "encoders": [("vae:sd21", 4), ("dinov2:giant", 1), ("clip", 1)],
        "source": "PCDMs stage2_train_inpaint_model.py: vae.encode of the [source | target] and [source | black] canvases "
                  "(two double-width images), DINOv2 of the source, CLIP of the target",
    },
    "pcdm-refine": {
        "encoders": [("vae:sd21", 2), ("dinov2:giant", 1)],
        "source": "PCDMs stage3_train_refined_model.py: vae.encode of the target and of the coarse image, DINOv2 of the source",
    },
    "imagpose": {
        "encoders": [("vae:sd15", 9), ("dinov2:base", 1)],
        "source": "IMAGPose train_stage1.py: vae.encode of the 2x2 canvas and of the masked canvas (four tiles each) and of the "
                  "reference tile, DINOv2-base of the reference (research/imagpose-official-code.md)",
    },
    "truepose": {
        "encoders": [("vae:sd15", 2), ("parsing", 1), ("clip_regions", 1)],
        "source": "TruePose Sec. 4.1 (no public code): VAE of the source and the target, SCHP parsing of the source, CLIP on the "
                  "box of every parsing class of the source (eq. 4)",
    },
    "reposedm": {
        "encoders": [("vae:sd15", 2), ("pose_latent:sd15", 1), ("higherhrnet", 1)],
        "source": "RePoseDM Sec. 3.1-3.3 (no public code): VAE of the source, the target and the target's skeleton render, "
                  "HigherHRNet on the render (P_phi(P), eq. 11)",
    },
}


# ---- step 1: extraction ----------------------------------------------------------------------------


def modules_of(extractor) -> list:
    """The torch modules an extractor holds (also those of the extractors it wraps:
    clip_regions' CLIP, pose_latent's VAE)."""
    import torch

    from posedata.extractors.base import Extractor

    found: dict[int, Any] = {}

    def walk(obj, depth: int) -> None:
        for value in vars(obj).values():
            if isinstance(value, torch.nn.Module):
                found[id(value)] = value
            elif isinstance(value, Extractor) and depth:
                walk(value, depth - 1)

    walk(extractor, 2)
    return list(found.values())


def parameter_count(modules: list) -> int:
    seen: dict[int, int] = {}
    for module in modules:
        for p in module.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


class PeakMemory:
    """The peak of the bytes held by tensors allocated inside the block (what a forward's
    activations and temporaries need on top of the weights): a dispatch mode that adds each
    new storage an operation returns and drops it when Python frees it (torch's MemTracker
    does this too, but hooks every module and fails on models without gradients)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.weak import WeakIdKeyDictionary

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                tracker._known((args, kwargs))  # the weights, the inputs: not allocated here
                out = func(*args, **(kwargs or {}))
                tracker._add(out)
                return out

        self.mode = Mode()
        self.live = self.peak = 0
        self._storages = WeakIdKeyDictionary()
        self._refs: list = []

    def _known(self, inputs) -> None:
        import torch
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(inputs):
            if isinstance(t, torch.Tensor) and not t.is_sparse:
                storage = t.untyped_storage()
                if storage not in self._storages:
                    self._storages[storage] = 0

    def _add(self, out) -> None:
        import weakref

        import torch
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.is_sparse:
                continue
            storage = t.untyped_storage()
            if storage in self._storages:
                continue
            size = storage.nbytes()
            self._storages[storage] = size
            self.live += size
            self.peak = max(self.peak, self.live)
            self._refs.append(weakref.ref(storage, lambda _, size=size: self._free(size)))

    def _free(self, size: int) -> None:
        self.live -= size

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


class Counted:
    """Wraps ExtractorChain.run_stage: every extractor's pass under FlopCounterMode and
    MemTracker; the results per feature spec."""

    def __init__(self):
        self.stages: dict[str, dict[str, Any]] = {}

    def install(self):
        import posedata.pipeline

        original = posedata.pipeline.ExtractorChain.run_stage
        counted = self

        def run_stage(chain, stage, rows):
            from torch.utils.flop_counter import FlopCounterMode

            live = [r for r in rows if r["status"] == "ok"]
            flops = FlopCounterMode(display=False)
            memory = PeakMemory()
            start = time.perf_counter()
            with flops, memory:
                original(chain, stage, rows)
            seconds = time.perf_counter() - start
            peak = memory.peak
            extractor = stage.extractor
            counted.stages[stage.spec.name] = {
                "feature": extractor.name,
                "folder": extractor.folder,
                "images": len(live),
                "batch_size": stage.batch_size,
                "flops": flops.get_total_flops(),
                "flops_per_image": flops.get_total_flops() / max(1, len(live)),
                "flops_by_op": {str(k): v for k, v in flops.get_flop_counts().get("Global", {}).items()},
                "parameters": parameter_count(modules_of(extractor)),
                "peak_allocated_bytes_cpu_fp32": peak,
                "cpu_seconds_one_thread": seconds,
            }
            if extractor.name == "clip_regions":  # the work depends on the regions found
                column = next(k for k in live[0] if k.startswith(f"f:{extractor.folder}:classes"))
                counted.stages[stage.spec.name]["regions_per_image"] = [len(np.load(io.BytesIO(r[column]), allow_pickle=False)) for r in live]
            print(f"  {stage.spec.name}: {flops.get_total_flops() / max(1, len(live)) / 1e9:.1f} GFLOPs/image, {counted.stages[stage.spec.name]['parameters'] / 1e6:.1f} M parameters ({seconds:.0f} s)", flush=True)

        posedata.pipeline.ExtractorChain.run_stage = run_stage
        return self


def build_dataset(out: Path, res: tuple[int, int], specs: list[str], counted: Counted) -> None:
    """The dataset of step 1: build with the first feature, extend with each other one."""
    from posedata.build import BuildConfig, build
    from posedata.extend import ExtendConfig, extend

    photos = Path(tempfile.mkdtemp(prefix="pdlimits")) / "person"
    photos.mkdir()
    sources = sorted(FIXTURES.glob("pcdms_img*_750x1101.png"))
    if not sources:
        raise SystemExit(f"no fixture photos in {FIXTURES}; set POSEDATA_FIXTURES")
    for path in sources:
        shutil.copyfile(path, photos / path.name)
    quiet = lambda _: None  # noqa: E731
    print(f"build: {specs[0]} ({len(sources)} photos at {res[0]}x{res[1]}, weights random)", flush=True)
    build(BuildConfig(source="folder", root=str(photos.parent), out=str(out), resolution=res, features=[specs[0]], weights="random", executor="local", overwrite=True), echo=quiet)
    for spec in specs[1:]:
        print(f"extend: {spec}", flush=True)
        extend(ExtendConfig(url=str(out), features=[spec], weights="random", executor="local"), echo=quiet)
    shutil.rmtree(photos.parent, ignore_errors=True)


def member_bytes(tar_path: Path) -> dict[str, int]:
    """Bytes per sample of a tar: 512-byte header + data padded to 512 per member (the
    archive's end blocks are paid once per shard and left out)."""
    per_key: dict[str, int] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            per_key[key] = per_key.get(key, 0) + 512 + math.ceil(member.size / 512) * 512
    return per_key


def feature_bytes(dataset_root: Path, card: dict[str, Any]) -> dict[str, float]:
    """Mean bytes per sample of every feature folder (and `image`: the base shard)."""
    out = {}
    for folder in card["features"]:
        tars = sorted((dataset_root / "features" / folder).glob("*.tar"))
        sizes = [v for t in tars for v in member_bytes(t).values()]
        out[folder] = sum(sizes) / len(sizes)
    sizes = [v for t in sorted((dataset_root / "shards").glob("*.tar")) for v in member_bytes(t).values()]
    out["image"] = sum(sizes) / len(sizes)
    return out


# ---- step 2: training ------------------------------------------------------------------------------


def to_meta(value):
    import torch

    if torch.is_tensor(value):
        return value.to("meta")
    if isinstance(value, dict):
        return {k: to_meta(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_meta(v) for v in value)
    return value


def training_step(name: str, dataset, batch_size: int = 2) -> dict[str, Any]:
    """FLOPs and saved-activation bytes per sample of one paper-size training step of a
    plugin, on the meta device (fp32: the meta device has no autocast; the bf16 activation
    bytes are taken as half the fp32 ones)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from posedata.train import plugin_class
    from posedata.train.run import batches_factory, load_null_embeddings

    plugin = plugin_class(name)(dataset.card, weights="random")
    plugin.set_null_embeddings(load_null_embeddings(dataset, plugin))
    batch = next(batches_factory(dataset, plugin, "train", batch_size, 0)(0, 0))
    samples = next(len(v) for v in batch.values() if torch.is_tensor(v) and v.ndim)
    with torch.device("meta"):
        torch.manual_seed(0)
        model = plugin.build_model()
    model = model.train()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    batch = to_meta(batch)
    flops = FlopCounterMode(display=False)
    memory = PeakMemory()
    with flops:
        # At the end of the forward every tensor saved for the backward is alive: the
        # forward's peak is the activation memory (fp32 here; bf16 half of it).
        with memory:
            loss = plugin.loss(model, batch, torch.Generator().manual_seed(0))
        loss.backward()
    activations = memory.peak / 2
    return {
        "plugin": name,
        "preset": plugin.preset_name,
        "paper_batch_size": plugin.defaults.batch_size,
        "measured_batch": samples,
        "trained_parameters": trained,
        "frozen_parameters": frozen,
        "flops_per_sample": flops.get_total_flops() / samples,
        "flops_by_op": {str(k): v / samples for k, v in flops.get_flop_counts().get("Global", {}).items()},
        "activation_bytes_per_sample_bf16": activations / samples,
        "needs": [n if isinstance(n, str) else list(n) for n in plugin.needs],
        "stream": getattr(plugin, "stream", "pairs"),
    }


# ---- step 4: bounds --------------------------------------------------------------------------------


def extraction_bound(flops_per_image: float, weight_bytes: float, batch: int, io_bytes: float) -> dict[str, dict[str, float]]:
    out = {}
    for gpu, spec in GPUS.items():
        compute = spec["flops"] / flops_per_image if flops_per_image else math.inf
        # the least HBM traffic per image: the weights once per batch, the image in, the features out
        traffic = weight_bytes / batch + io_bytes
        bandwidth = spec["bandwidth"] / traffic if traffic else math.inf
        out[gpu] = {"images_per_s": min(compute, bandwidth), "compute_bound": compute, "bandwidth_bound": bandwidth}
    return out


def training_bound(flops_per_sample: float, trained: int, activation_bytes: float, batch: int) -> dict[str, dict[str, float]]:
    out = {}
    for gpu, spec in GPUS.items():
        compute_s = batch * flops_per_sample / spec["flops"]
        traffic = ADAMW_BYTES_PER_PARAM * trained + 2 * activation_bytes * batch
        memory_s = traffic / spec["bandwidth"]
        out[gpu] = {"samples_per_s": batch / max(compute_s, memory_s), "compute_s_per_step": compute_s, "memory_s_per_step": memory_s,
                    "limited_by": "compute" if compute_s >= memory_s else "memory bandwidth"}
    return out


def gpu_of(gpu_name: str) -> str | None:
    """Which GPU of GPUS `torch.cuda.get_device_name()` names, if any."""
    return next((g for g, spec in GPUS.items() if any(n in gpu_name for n in spec["names"])), None)


def load_limits(path: Path = LIMITS_JSON) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def extraction_bound_of(specs: list[str], gpu_name: str, limits: dict[str, Any] | None) -> tuple[str, float] | None:
    """(GPU, images/s bound) for a build of `specs` on the GPU named `gpu_name`: one worker
    runs them one after the other, so 1 / the sum of their seconds per image at the bound.
    None without limits.json, for another GPU, or a feature it did not count."""
    gpu = gpu_of(gpu_name)
    if limits is None or gpu is None:
        return None
    rows = {r["spec"]: r for r in limits["extraction"]}
    if not all(s in rows for s in specs):
        return None
    return gpu, 1 / sum(1 / rows[s]["bound"][gpu]["images_per_s"] for s in specs)


def training_bound_of(plugin: str, mode: str, gpu_name: str, limits: dict[str, Any] | None) -> tuple[str, float] | None:
    """(GPU, samples/s bound) of one plugin's paper-size step, `mode` "cached" or "online"."""
    gpu = gpu_of(gpu_name)
    if limits is None or gpu is None:
        return None
    row = next((r for r in limits["training"] if r["plugin"] == plugin and f"bound_{mode}" in r), None)
    return (gpu, row[f"bound_{mode}"][gpu]["samples_per_s"]) if row else None


# ---- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--res", default="512x352", help="stored resolution HxW (the papers' 512x352 by default)")
    parser.add_argument("--plugins", default=None, help="comma-separated plugins (default: every registered one)")
    parser.add_argument("--regions", type=float, default=REGIONS, help="clip_regions: parsing classes per image the counts assume (CLIP runs once per region)")
    parser.add_argument("--reuse", action="store_true", help="reuse the dataset and extraction counts of an earlier run at this resolution")
    parser.add_argument("--out", default=str(LIMITS_JSON))
    parser.add_argument("--render", metavar="JSON", help="only print (and write beside it) the tables of an earlier run's JSON")
    args = parser.parse_args()
    if args.render:
        render_earlier(args.render, markdown)
        return

    import torch

    torch.set_num_threads(1)
    from posedata.extractors import DEFAULT_FEATURES, dependency_order
    from posedata.reader import Dataset
    from posedata.train import REGISTRY

    res = tuple(int(v) for v in args.res.lower().split("x"))
    specs = dependency_order(list(DEFAULT_FEATURES))
    data = RESULTS / "limits_data" / f"random-{res[0]}x{res[1]}"
    counts_path = data.parent / f"random-{res[0]}x{res[1]}-extraction.json"
    started = time.perf_counter()
    if args.reuse and counts_path.is_file() and (data / "ds" / "dataset.json").is_file():
        stages = json.loads(counts_path.read_text())
    else:
        counted = Counted().install()
        build_dataset(data / "ds", res, specs, counted)
        stages = counted.stages
        counts_path.parent.mkdir(parents=True, exist_ok=True)
        counts_path.write_text(json.dumps(stages, indent=2) + "\n")
    dataset = Dataset(str(data / "ds"))
    card = dataset.card
    sizes = feature_bytes(data / "ds", card)

    extraction = []
    for spec in specs:
        s = dict(stages[spec])
        if s.get("regions_per_image"):
            found = sum(s["regions_per_image"])
            s["flops_per_region"] = s["flops"] / found
            s["flops_per_image"] = s["flops_per_region"] * args.regions
        # GPU: the extractors compute in the dataset dtype (fp16): 2 bytes per weight, and
        # activations half of the fp32 ones measured on CPU
        weight_bytes = 2 * s["parameters"]
        out_bytes = sizes[s["folder"]]
        in_bytes = 3 * res[0] * res[1]
        extraction.append({
            "spec": spec, **{k: s[k] for k in ("feature", "folder", "batch_size", "parameters", "flops_per_image", "images")},
            **({"regions_assumed": args.regions, "regions_found_per_image": s["regions_per_image"], "flops_per_region": s["flops_per_region"]} if s.get("regions_per_image") else {}),
            "weight_bytes_fp16": weight_bytes,
            "activation_bytes_per_image_fp16": s["peak_allocated_bytes_cpu_fp32"] / 2 / max(1, s["images"]),
            "bytes_written_per_image": out_bytes,
            "bound": extraction_bound(s["flops_per_image"], weight_bytes, s["batch_size"], in_bytes + out_bytes),
        })
    total_flops = sum(r["flops_per_image"] for r in extraction)
    extraction.append({
        "spec": "full set", "feature": "+".join(specs), "parameters": sum(r["parameters"] for r in extraction),
        "flops_per_image": total_flops, "weight_bytes_fp16": sum(r["weight_bytes_fp16"] for r in extraction),
        "activation_bytes_per_image_fp16": max(r["activation_bytes_per_image_fp16"] for r in extraction),
        "bytes_written_per_image": sum(r["bytes_written_per_image"] for r in extraction) + sizes["image"],
        "bound": {gpu: {"images_per_s": 1 / sum(1 / r["bound"][gpu]["images_per_s"] for r in extraction)} for gpu in GPUS},
    })
    per_image = {r["spec"]: r["flops_per_image"] for r in extraction}

    training = []
    for name in [p.strip() for p in (args.plugins or ",".join(REGISTRY)).split(",") if p.strip()]:
        print(f"training step: {name}", flush=True)
        try:
            step = training_step(name, dataset)
        except Exception as e:  # noqa: BLE001 - a plugin the meta device cannot run is reported, not fatal
            training.append({"plugin": name, "error": f"{e.__class__.__name__}: {e}"})
            print(f"  not counted: {training[-1]['error']}", flush=True)
            continue
        images = 4 if step["stream"] == "groups" else 2
        online = ONLINE.get(name)
        encoder_flops = sum(per_image[spec] * n for spec, n in online["encoders"]) if online else None
        folders = {}
        for need in step["needs"]:
            column = dataset.column(need if isinstance(need, str) else tuple(need))
            folders[column.folder] = sizes[column.folder]
        read_cached = images * sum(folders.values())
        encoded = {f for spec, _ in (online["encoders"] if online else []) for f, c in card["features"].items() if c.get("spec") == spec}
        read_online = images * (sizes["image"] + sum(v for f, v in folders.items() if f not in encoded)) if online else None
        batch = step["paper_batch_size"]
        # fp32 weights, grads and AdamW moments of what is trained, bf16 copies of frozen parts, activations at B
        memory = 16 * step["trained_parameters"] + 2 * step["frozen_parameters"] + step["activation_bytes_per_sample_bf16"] * batch
        row = {
            **step,
            "images_per_sample": images,
            "memory_bytes_at_paper_batch": memory,
            "bytes_read_per_sample_cached": read_cached,
            "bytes_read_per_sample_online": read_online,
            "online_encoders": online,
            "encoder_flops_per_sample": encoder_flops,
            "online_flops_per_sample": step["flops_per_sample"] + encoder_flops if online else None,
            "bound_cached": training_bound(step["flops_per_sample"], step["trained_parameters"], step["activation_bytes_per_sample_bf16"], batch),
        }
        if online:
            row["bound_online"] = training_bound(row["online_flops_per_sample"], step["trained_parameters"], step["activation_bytes_per_sample_bf16"], batch)
            row["online_vs_cached_flops"] = row["online_flops_per_sample"] / step["flops_per_sample"]
            row["cached_vs_online_bound"] = row["bound_cached"]["H100 SXM"]["samples_per_s"] / row["bound_online"]["H100 SXM"]["samples_per_s"]
        training.append(row)
        print(f"  {step['flops_per_sample'] / 1e12:.3f} TFLOPs/sample cached" + (f", {row['online_flops_per_sample'] / 1e12:.3f} online ({row['online_vs_cached_flops']:.1f}x)" if online else ""), flush=True)

    result = {
        "command": "python bench/limits.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
        "torch": torch.__version__,
        "resolution": list(res),
        "seconds": time.perf_counter() - started,
        "gpus": GPUS,
        "gpu_source": GPU_SOURCE,
        "adamw_bytes_per_param": ADAMW_BYTES_PER_PARAM,
        "image_bytes_per_sample": sizes["image"],
        "extraction": extraction,
        "training": training,
    }
    write_report(args.out, result, markdown)


def si(value: float | None, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return ""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g} {prefix}{unit}"
    return f"{value:.{digits}g} {unit}".strip()


def rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def markdown(result: dict[str, Any]) -> str:
    res = result["resolution"]
    gpus = list(result["gpus"])
    lines = [
        f"- command: `{result['command']}`",
        f"- date: {result['date']}; git {result['git']}; torch {result['torch']}; counted on CPU / the meta device (no GPU)",
        f"- resolution {res[0]}x{res[1]}; every model at its real size (random init); GPUs: "
        + "; ".join(f"{g} {s['flops'] / 1e12:g} TFLOPS dense bf16, {s['bandwidth'] / 1e12:g} TB/s" for g, s in result["gpus"].items())
        + f" ({result['gpu_source']})",
        "",
        "Extraction: per image, forward only (FLOPs = 2 x multiply-adds of matmuls, convolutions and attention, as torch.utils.flop_counter counts them); "
        "bound = peak / FLOPs (the least HBM traffic, weights once per batch + image + features, allows far more: compute-bound).",
        "",
        "| feature | parameters | GFLOPs / image | activations / image (fp16) | bytes written / image | " + " | ".join(f"{g} images/s" for g in gpus) + " |",
        "|---|---|---|---|---|" + "---|" * len(gpus),
    ]
    for r in result["extraction"]:
        name = f"**{r['spec']}**" if r["spec"] == "full set" else r["spec"]
        lines.append(
            f"| {name} | {r['parameters'] / 1e6:,.1f} M | {r['flops_per_image'] / 1e9:,.1f} | {si(r['activation_bytes_per_image_fp16'], 'B')} | {si(r['bytes_written_per_image'], 'B')} | "
            + " | ".join(rate(r["bound"][g]["images_per_s"]) for g in gpus) + " |"
        )
    regions = next((r for r in result["extraction"] if r.get("regions_assumed")), None)
    if regions:
        found = regions["regions_found_per_image"]
        lines += ["", f"clip_regions: {regions['flops_per_region'] / 1e9:.1f} GFLOPs per region (one CLIP ViT-H/14 pass), counted at {regions['regions_assumed']:g} regions per image "
                  f"(about the ATR classes of a full-body photo: our guess; `--regions M`); the random-weight parser of this run found {sum(found) / len(found):.1f} per image."]
    lines += [
        "",
        f"Training: one step at paper size (`--weights random`, preset paper), per sample (a pair; IMAGPose a group of four), forward + backward; "
        f"online = the step + the frozen encoders the official code runs in it (at the extraction FLOPs above). Bound at the paper batch B: "
        f"B / max(B x FLOPs / peak, ({result['adamw_bytes_per_param']} B x trained parameters + 2 x activations x B) / bandwidth).",
        "",
        "| plugin | trained (frozen) parameters | batch B | TFLOPs / sample cached | online | **online / cached** | activations / sample (bf16) | memory at B | read / sample cached (online) | "
        + " | ".join(f"{g} samples/s cached (online)" for g in gpus) + " | read at the H100 SXM cached bound |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(gpus) + "---|",
    ]
    for r in result["training"]:
        if "error" in r:
            lines.append(f"| {r['plugin']} | not counted: {r['error'][:160]} |")
            continue
        online = r.get("online_flops_per_sample")
        online_text = "" if online is None else f"{online / 1e12:.3g}"
        ratio_text = "" if online is None else f"{r['online_vs_cached_flops']:.1f}x"
        bounds = []
        for g in gpus:
            cached = r["bound_cached"][g]
            text = rate(cached["samples_per_s"]) + ("*" if cached["limited_by"] != "compute" else "")
            if "bound_online" in r:
                text += f" ({rate(r['bound_online'][g]['samples_per_s'])})"
            bounds.append(text)
        read_rate = r["bytes_read_per_sample_cached"] * r["bound_cached"]["H100 SXM"]["samples_per_s"]
        lines.append(
            f"| {r['plugin']} | {r['trained_parameters'] / 1e6:,.1f} M ({r['frozen_parameters'] / 1e6:,.1f} M) | {r['paper_batch_size']} | {r['flops_per_sample'] / 1e12:.3g} | "
            f"{online_text} | **{ratio_text}** | {si(r['activation_bytes_per_sample_bf16'], 'B')} | {si(r['memory_bytes_at_paper_batch'], 'B')} | "
            f"{si(r['bytes_read_per_sample_cached'], 'B')} ({si(r.get('bytes_read_per_sample_online'), 'B')}) | " + " | ".join(bounds) + f" | {si(read_rate, 'B/s')} |"
        )
    lines += ["", "\\* limited by memory bandwidth (the optimizer's update and the activations), not compute. Memory at B: fp32 weights, gradients and AdamW moments of the trained parameters (16 B each), bf16 frozen ones, activations x B (no gradient checkpointing).", "", "Online encoders per sample:", ""]
    for r in result["training"]:
        if r.get("online_encoders"):
            enc = ", ".join(f"{spec} x{n}" for spec, n in r["online_encoders"]["encoders"])
            lines.append(f"- {r['plugin']}: {enc} = {r['encoder_flops_per_sample'] / 1e12:.3g} TFLOPs ({r['online_encoders']['source']})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
