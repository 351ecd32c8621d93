"""The `posedata` command line: build, inspect, show, train."""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys

import click

from posedata.extractors import MODEL_PRESETS
from posedata.extractors.base import WEIGHTS_MODES

STORAGE_OPTIONS_HELP = "JSON dict passed to fsspec for --out/--shards URLs, e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\"}' (the usual AWS_* env vars work too)."


def parse_resolution(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected HxW as the papers write it, e.g. 512x352 (512 high, 352 wide)") from None
    if h < 16 or w < 16 or h % 8 or w % 8:
        raise click.BadParameter(f"{value!r}: height and width must be multiples of 8 and at least 16 (the VAE works at 1/8)")
    return h, w


def parse_assignments(values: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"{v!r}: expected {what}")
        k, val = v.split("=", 1)
        out[k.strip()] = val.strip()
    return out


def parse_storage_options(value: str | None) -> dict:
    if not value:
        return {}
    try:
        opts = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"--storage-options is not valid JSON: {e}") from None
    if not isinstance(opts, dict):
        raise click.BadParameter("--storage-options must be a JSON object")
    return opts


class PosedataGroup(click.Group):
    """The one place errors reach the user. posedata's own errors (PosedataError: a bad
    option, input or dataset) and file-system errors (a path that is missing, unreadable or
    read-only) become one `Error: ...` line and exit code 1. Anything else is a bug: its
    traceback goes through, with the command that triggered it."""

    def invoke(self, ctx: click.Context):
        from posedata.errors import PosedataError

        try:
            return super().invoke(ctx)
        except PosedataError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            raise click.ClickException(_os_error_line(e)) from None
        except Exception as e:
            e.add_note(f"posedata bug while running: {shlex.join(['posedata', *sys.argv[1:]])}\nPlease report it with this traceback.")
            raise


def _os_error_line(error: OSError) -> str:
    """`path: reason` for a file-system error (errno's words when there are some)."""
    if error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error) or error.__class__.__name__


@click.group(cls=PosedataGroup)
@click.option("-v", "--verbose", is_flag=True, help="More logging.")
@click.version_option(package_name="posedata")
def main(verbose: bool) -> None:
    """posedata: compute pose, parsing, VAE, CLIP and DINOv2 features once, store them as
    WebDataset shards with Parquet manifests, and train PGPIS models from them."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


# ---- build ------------------------------------------------------------------------------------


def build_options(fn):
    options = [
        click.option("--root", required=True, help="The dataset's folder on disk."),
        click.option("--out", required=True, help="Where to write the dataset: a path or an fsspec URL (s3://, gs://, file://)."),
        click.option("--res", "resolution", default=None, help="Stored resolution H x W, e.g. 512x352 (default: the source's own)."),
        click.option("--features", default=None, help="Comma-separated feature specs, e.g. openpose,clip,vae:sd21 (default: everything PCDMs, IMAGPose, TruePose and RePoseDM read; annotated keypoints are added when the source has them)."),
        click.option("--preset", type=click.Choice(sorted(MODEL_PRESETS)), default=None, help="The features one model family needs (instead of --features)."),
        click.option("--weights", type=click.Choice(WEIGHTS_MODES), default="pretrained", show_default=True, help="pretrained: real weights from hub ids / local dirs; random: full-size random init (benchmarks); tiny: tiny random models (tests, CPU)."),
        click.option("--model", "models", multiple=True, help="FEATURE=HUB_ID_OR_DIR: override a feature's pretrained model, e.g. clip=/models/clip-vit-h."),
        click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp8", "fp32"]), default="fp16", show_default=True, help="Storage dtype of embeddings and latents (fp8: e4m3 with a per-tensor scale)."),
        click.option("--shard-size", type=int, default=1000, show_default=True, help="Target samples per shard (groups are never split)."),
        click.option("--executor", type=click.Choice(["ray", "local"]), default="ray", show_default=True, help="ray: Ray Data job (embedded local Ray, or --address); local: one process, for debugging."),
        click.option("--address", default=None, help="Join a running Ray cluster (e.g. auto or ray://head:10001)."),
        click.option("--workers", type=int, default=None, help="Actors per extractor when running on CPU (GPUs: one per GPU share)."),
        click.option("--batch-size", "batch_sizes", multiple=True, help="FEATURE=N: batch size for one extractor."),
        click.option("--storage-options", default=None, help=STORAGE_OPTIONS_HELP),
        click.option("--flip", is_flag=True, help="vae: also store the latents of the horizontally flipped image (flip augmentation with cached latents)."),
        click.option("--overwrite", is_flag=True, help="Delete what is at --out and start over (default: resume)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.group()
def build() -> None:
    """Build a dataset from a source: `posedata build deepfashion --root ... --out ...`."""


def _feature_specs(features: str | None, preset: str | None) -> list[str] | None:
    if features and preset:
        raise click.BadParameter("give --features or --preset, not both")
    if preset:
        return list(MODEL_PRESETS[preset])
    return [f.strip() for f in features.split(",") if f.strip()] if features else None


def _run_build(source: str, source_options: dict, **kw) -> None:
    from posedata.build import BuildConfig, build as run_build
    from posedata.sources import SourceError

    config = BuildConfig(
        source=source,
        root=kw["root"],
        out=kw["out"],
        resolution=parse_resolution(kw["resolution"]),
        features=_feature_specs(kw["features"], kw["preset"]),
        weights=kw["weights"],
        models=parse_assignments(kw["models"], "FEATURE=HUB_ID_OR_DIR"),
        dtype=kw["dtype"],
        shard_size=kw["shard_size"],
        source_options=source_options,
        storage_options=parse_storage_options(kw["storage_options"]),
        executor=kw["executor"],
        address=kw["address"],
        workers=kw["workers"],
        batch_sizes={k: int(v) for k, v in parse_assignments(kw["batch_sizes"], "FEATURE=N").items()},
        overwrite=kw["overwrite"],
        flip=kw["flip"],
    )
    try:
        run_build(config, echo=click.echo)
    except (SourceError, KeyError) as e:
        raise click.ClickException(str(e).strip("'\"")) from None


@build.command("deepfashion")
@build_options
def build_deepfashion(**kw) -> None:
    """DeepFashion In-Shop: img/ or img_highres/ tree with train.lst/test.lst, flattened
    train_highres/ test_highres/, or the PIDM layout; pair and keypoint CSVs are imported."""
    _run_build("deepfashion", {}, **kw)


@build.command("market1501")
@build_options
def build_market(**kw) -> None:
    """Market-1501: bounding_box_train/ and bounding_box_test/ (junk ids -1 and 0000 rejected)."""
    _run_build("market1501", {}, **kw)


@build.command("folder")
@build_options
@click.option("--group-regex", default=None, help="Regex on the path relative to --root; the named group 'group' (or group 1) is the person/outfit group. Default: the parent folder.")
@click.option("--test-fraction", type=float, default=0.0, show_default=True, help="Hold out this fraction of groups as split 'test'.")
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of the group hold-out.")
def build_folder(group_regex, test_fraction, split_seed, **kw) -> None:
    """Any folder of photos: group = parent folder (or --group-regex)."""
    if not 0.0 <= test_fraction < 1.0:
        raise click.BadParameter("--test-fraction must be in [0, 1)")
    _run_build("folder", {"group_regex": group_regex, "test_fraction": test_fraction, "seed": split_seed}, **kw)


@main.command()
@click.argument("url")
@click.option("--features", default=None, help="Comma-separated feature specs to add, e.g. dinov2,parsing or vae:sd15.")
@click.option("--preset", type=click.Choice(sorted(MODEL_PRESETS)), default=None, help="Add what one model family needs.")
@click.option("--weights", type=click.Choice(WEIGHTS_MODES), default="pretrained", show_default=True)
@click.option("--model", "models", multiple=True, help="FEATURE=HUB_ID_OR_DIR: override a feature's pretrained model.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp8", "fp32"]), default=None, help="Storage dtype (default: the dataset's).")
@click.option("--executor", type=click.Choice(["ray", "local"]), default="ray", show_default=True)
@click.option("--address", default=None, help="Join a running Ray cluster.")
@click.option("--workers", type=int, default=None, help="Actors per extractor when running on CPU.")
@click.option("--batch-size", "batch_sizes", multiple=True, help="FEATURE=N: batch size for one extractor.")
@click.option("--flip", is_flag=True, help="vae: also store the latents of the horizontally flipped image.")
@click.option("--storage-options", default=None, help=STORAGE_OPTIONS_HELP)
def extend(url, features, preset, models, batch_sizes, storage_options, **kw) -> None:
    """Add features to a finished dataset (local or in a bucket) without touching what is there."""
    from posedata.extend import ExtendConfig, ExtendError, extend as run_extend

    specs = _feature_specs(features, preset)
    if not specs:
        raise click.BadParameter("name the features to add with --features or --preset")
    config = ExtendConfig(
        url=url,
        features=specs,
        models=parse_assignments(models, "FEATURE=HUB_ID_OR_DIR"),
        batch_sizes={k: int(v) for k, v in parse_assignments(batch_sizes, "FEATURE=N").items()},
        storage_options=parse_storage_options(storage_options),
        **kw,
    )
    try:
        run_extend(config, echo=click.echo)
    except (ExtendError, FileNotFoundError, KeyError) as e:
        raise click.ClickException(str(e).strip("'\"")) from None


# ---- looking at it ----------------------------------------------------------------------------


@main.command()
@click.argument("url")
@click.option("--storage-options", default=None, help=STORAGE_OPTIONS_HELP)
def inspect(url: str, storage_options: str | None) -> None:
    """Print the card, counts per split, features with fingerprints, rejects by reason."""
    from posedata.inspect import describe

    try:
        click.echo(describe(url, parse_storage_options(storage_options)))
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None


@main.command()
@click.argument("url")
@click.option("--features", default=None, help="Comma-separated features to check: name, name:preset or name@fingerprint (default: every feature of the card).")
@click.option("--storage-options", default=None, help=STORAGE_OPTIONS_HELP)
def verify(url: str, features: str | None, storage_options: str | None) -> None:
    """Re-read every shard and sidecar and check keys, counts, fingerprints and every array
    against the manifest and the card; print what is wrong, by file, shard and key (exit code 1)."""
    from posedata.verify import format_report, verify as run_verify

    specs = [f.strip() for f in features.split(",") if f.strip()] if features else None
    report = run_verify(url, parse_storage_options(storage_options), features=specs)
    click.echo(format_report(report))
    if not report.ok:
        raise SystemExit(1)


@main.command()
@click.argument("url")
@click.option("--out", required=True, help="PNG file to write.")
@click.option("-n", "--count", default=8, show_default=True, help="Samples to show.")
@click.option("--split", default=None, help="Split to show (default: the first).")
@click.option("--storage-options", default=None, help=STORAGE_OPTIONS_HELP)
def show(url: str, out: str, count: int, split: str | None, storage_options: str | None) -> None:
    """Draw a contact sheet: image, pose overlays (and parsing), plus the rejects."""
    from posedata.show import contact_sheet

    try:
        click.echo(contact_sheet(url, out, count=count, split=split, storage_options=parse_storage_options(storage_options)))
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None


# ---- training ---------------------------------------------------------------------------------


@main.command()
@click.argument("plugin")
@click.option("--shards", required=True, help="Dataset made by `posedata build` (path or fsspec URL).")
@click.option("--out", required=True, help="Run directory: config, loss.csv/png, checkpoints.")
@click.option("--weights", type=click.Choice(WEIGHTS_MODES), default="pretrained", show_default=True, help="tiny: tiny random model; random: paper size, random init; pretrained: paper size from the official initialisation.")
@click.option("--model", default=None, help="Hub id or local directory for --weights pretrained (default: the plugin's).")
@click.option("--split", default="train", show_default=True)
@click.option("--max-steps", type=int, default=1000, show_default=True)
@click.option("--batch-size", type=int, default=None, help="Per-device batch size (default: the plugin's).")
@click.option("--lr", "learning_rate", type=float, default=None, help="Learning rate (default: the plugin's).")
@click.option("--warmup-steps", type=int, default=None, help="Warm-up steps (default: the plugin's).")
@click.option("--grad-accum", "gradient_accumulation", type=int, default=1, show_default=True)
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default="no", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", default=None, help="'latest' or a checkpoint directory: continue from there.")
@click.option("--checkpoint-every", type=int, default=500, show_default=True)
@click.option("--log-every", type=int, default=10, show_default=True)
@click.option("--num-workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--overwrite", is_flag=True, help="Delete the run directory first and start over.")
@click.option("--ema-decay", type=float, default=None, help="Keep an EMA of the weights with this decay (e.g. 0.9999), saved as checkpoint-<step>/ema/.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward (less memory, slower).")
@click.option("--attention", type=click.Choice(["sdpa", "keep"]), default="sdpa", show_default=True, help="sdpa: torch scaled_dot_product_attention on every diffusers attention layer; keep: as the model built it.")
@click.option("--skip-corrupt-shards", "skip_corrupt", is_flag=True, help="Skip shards that cannot be read (corrupt, truncated, missing, keys out of line) with a warning naming each, instead of stopping.")
@click.option("--storage-options", default=None, help=STORAGE_OPTIONS_HELP)
def train(plugin, shards, out, storage_options, resume, **kw) -> None:
    """Train a plugin from precomputed features, e.g. `posedata train pcdm-prior --shards URL --out DIR`."""
    from posedata.train import REGISTRY
    from posedata.train.run import run_training

    if plugin not in REGISTRY:
        raise click.BadParameter(f"unknown plugin {plugin!r}; known: {', '.join(sorted(REGISTRY))}", param_hint="PLUGIN")
    try:
        summary = run_training(plugin, shards, out, storage_options=parse_storage_options(storage_options), resume=resume or False, **kw)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        raise click.ClickException(str(e).strip("'\"")) from None
    if os.environ.get("RANK", "0") == "0":  # under `accelerate launch`, once
        click.echo(json.dumps(summary, indent=2, default=str))


@main.group()
def sample() -> None:
    """Sample trained models on a split's pairs: `posedata sample pcdm ...`."""


@sample.command("pcdm")
@click.option("--shards", required=True, help="Dataset made by `posedata build` (path or fsspec URL).")
@click.option("--out", required=True, help="Folder for the PNGs and the contact sheet.")
@click.option("--prior", default=None, help="pcdm-prior run directory (or checkpoint).")
@click.option("--inpaint", default=None, help="pcdm-inpaint run directory (or checkpoint).")
@click.option("--refine", default=None, help="pcdm-refine run directory (or checkpoint).")
@click.option("--split", default="test", show_default=True)
@click.option("-n", "--count", default=8, show_default=True, help="Pairs to sample (the first of the split's pair table).")
@click.option("--batch-size", default=4, show_default=True)
@click.option("--steps", default=50, show_default=True, help="Denoising steps per stage.")
@click.option("--guidance", "guidance_scale", default=2.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--scheduler", type=click.Choice(["ddim", "unipc"]), default="ddim", show_default=True, help="Inpaint / refine sampler (the official test scripts use unipc with 20 steps).")
@click.option("--seed", default=42, show_default=True)
@click.option("--storage-options", default=None, help=STORAGE_OPTIONS_HELP)
def sample_pcdm(shards, out, storage_options, **kw) -> None:
    """The PCDMs chain: prior -> inpaint -> refine; any stage can run alone. Writes one PNG per
    pair and stage, and a contact sheet (source | target pose | coarse | refined | truth)."""
    from posedata.train.sample import sample_pcdm as run_sample

    try:
        summary = run_sample(shards, out, storage_options=parse_storage_options(storage_options), echo=click.echo, **kw)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise click.ClickException(str(e).strip("'\"")) from None
    click.echo(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
