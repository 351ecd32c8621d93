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
from posedata.storage import STORAGE_DTYPES

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
    if h > MAX_STORED_SIDE or w > MAX_STORED_SIDE:
        raise click.BadParameter(f"{value!r}: at most {MAX_STORED_SIDE} pixels per side (the papers train at 256x176 to 1024x768)")
    return h, w


MAX_STORED_SIDE = 8192


def parse_batch_sizes(values: tuple[str, ...]) -> dict[str, int]:
    """--batch-size FEATURE=N, N a whole number >= 1 (which features exist is checked once
    the build knows its features)."""
    sizes = {}
    for feature, value in parse_assignments(values, "FEATURE=N").items():
        try:
            sizes[feature] = int(value)
        except ValueError:
            raise click.BadParameter(f"{feature}={value}: the batch size must be a whole number, e.g. {feature}=8", param_hint="--batch-size") from None
        if sizes[feature] < 1:
            raise click.BadParameter(f"{feature}={value}: the batch size must be at least 1", param_hint="--batch-size")
    return sizes


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
        click.option("--dtype", type=click.Choice(STORAGE_DTYPES), default="fp16", show_default=True, help="Storage dtype of embeddings and latents (fp8: e4m3 with a per-tensor scale)."),
        click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True, help="Target samples per shard (groups are never split)."),
        click.option("--executor", type=click.Choice(["ray", "local"]), default="ray", show_default=True, help="ray: Ray job (embedded local Ray, or --address); local: one process, for debugging."),
        click.option("--address", default=None, help="Join a running Ray cluster (e.g. auto or ray://head:10001)."),
        click.option("--workers", type=click.IntRange(min=1), default=None, help="Ray workers, each holding every model of the build: per GPU with GPUs, in all on CPU (default 1)."),
        click.option("--batch-size", "batch_sizes", multiple=True, help="FEATURE=N: batch size for one extractor."),
        click.option("--storage-options", default=None, help=STORAGE_OPTIONS_HELP),
        click.option("--flip", is_flag=True, help="vae: also store the latents of the horizontally flipped image (flip augmentation with cached latents)."),
        click.option("--overwrite", is_flag=True, help="Delete what is at --out and start over (default: resume)."),
        click.option("-v", "--verbose", is_flag=True, help="Ray's own logs and progress too (posedata prints its own progress either way)."),
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


def _more_logging(verbose: bool) -> None:
    """`build/extend --verbose`, as `posedata --verbose`: INFO logging, which also lets Ray
    print its own logs and progress (posedata.pipeline.run_with_ray)."""
    if verbose:
        logging.getLogger().setLevel(logging.INFO)


def _run_build(source: str, source_options: dict, **kw) -> None:
    _more_logging(kw.pop("verbose", False))
    from posedata.build import BuildConfig
    from posedata.build import build as run_build

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
        batch_sizes=parse_batch_sizes(kw["batch_sizes"]),
        overwrite=kw["overwrite"],
        flip=kw["flip"],
    )
    run_build(config, echo=click.echo)  # errors: PosedataGroup


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
@click.option("--dtype", type=click.Choice(STORAGE_DTYPES), default=None, help="Storage dtype (default: the dataset's).")
@click.option("--executor", type=click.Choice(["ray", "local"]), default="ray", show_default=True)
@click.option("--address", default=None, help="Join a running Ray cluster.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Ray workers, each holding every new model: per GPU with GPUs, in all on CPU (default 1).")
@click.option("--batch-size", "batch_sizes", multiple=True, help="FEATURE=N: batch size for one extractor.")
@click.option("--flip", is_flag=True, help="vae: also store the latents of the horizontally flipped image.")
@click.option("--storage-options", default=None, help=STORAGE_OPTIONS_HELP)
@click.option("-v", "--verbose", is_flag=True, help="Ray's own logs and progress too.")
def extend(url, features, preset, models, batch_sizes, storage_options, verbose, **kw) -> None:
    """Add features to a finished dataset (local or in a bucket) without touching what is there."""
    from posedata.extend import ExtendConfig, ExtendError
    from posedata.extend import extend as run_extend

    _more_logging(verbose)

    specs = _feature_specs(features, preset)
    if not specs:
        raise click.BadParameter("name the features to add with --features or --preset")
    config = ExtendConfig(
        url=url,
        features=specs,
        models=parse_assignments(models, "FEATURE=HUB_ID_OR_DIR"),
        batch_sizes=parse_batch_sizes(batch_sizes),
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

    click.echo(describe(url, parse_storage_options(storage_options)))


@main.command()
@click.argument("url")
@click.option("--features", default=None, help="Comma-separated features to check: name, name:preset or name@fingerprint (default: every feature of the card).")
@click.option("--storage-options", default=None, help=STORAGE_OPTIONS_HELP)
def verify(url: str, features: str | None, storage_options: str | None) -> None:
    """Re-read every shard and sidecar and check keys, counts, fingerprints and every array
    against the manifest and the card; print what is wrong, by file, shard and key (exit code 1)."""
    from posedata.verify import format_report
    from posedata.verify import verify as run_verify

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

    click.echo(contact_sheet(url, out, count=count, split=split, storage_options=parse_storage_options(storage_options)))


# ---- training and sampling --------------------------------------------------------------------


class PluginCommands(click.Group):
    """`posedata train PLUGIN` / `posedata sample PLUGIN`: one command per registered plugin
    (posedata.train.REGISTRY), built when asked for, with the plugin's own options."""

    def __init__(self, *args, make_command=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.make_command = make_command

    def list_commands(self, ctx):
        from posedata.train import REGISTRY

        return sorted({*self.commands, *REGISTRY})

    def get_command(self, ctx, name):
        from posedata.train import REGISTRY, plugin_class

        if name in self.commands:
            return self.commands[name]
        if name in REGISTRY:
            return self.make_command(name, plugin_class(name))
        return None

    def resolve_command(self, ctx, args):
        if args and not args[0].startswith("-") and args[0] not in self.list_commands(ctx):
            raise click.UsageError(f"unknown plugin {args[0]!r}; known: {', '.join(self.list_commands(ctx))}", ctx)
        return super().resolve_command(ctx, args)


def _plugin_summary(cls) -> str:
    return (cls.__doc__ or cls.name).strip().splitlines()[0]


def _plugin_options(options) -> list:
    """click options for a plugin's declared `PluginOption`s."""
    made = []
    for o in options:
        flag = "--" + o.name.replace("_", "-")
        if o.type is bool:
            made.append(click.Option([f"{flag}/--no-{flag[2:]}", o.name], default=o.default, help=o.help))
        else:
            kind = click.Choice(o.choices) if o.choices else o.type
            made.append(click.Option([flag, o.name], type=kind, default=o.default, show_default=o.default is not None, help=o.help))
    return made


def _preset_default(cls, field: str) -> str:
    values = {name: getattr(p.train, field) for name, p in cls.presets.items()}
    if len(set(values.values())) == 1:
        return str(next(iter(values.values())))
    return ", ".join(f"{v} ({k})" for k, v in values.items())


def _train_command(name: str, cls) -> click.Command:
    from posedata.train.config import ATTENTION_MODES, LR_SCHEDULES, MIXED_PRECISION

    def preset(field: str, what: str) -> str:
        return f"{what} [default: {_preset_default(cls, field)}]"

    params = [
        click.Option(["--shards"], required=True, help="Dataset made by `posedata build` (path or fsspec URL)."),
        click.Option(["--out"], required=True, help="Run directory: config, loss.csv/png, checkpoints."),
        click.Option(["--weights"], type=click.Choice(WEIGHTS_MODES), default="pretrained", show_default=True, help="tiny: tiny random model (and the tiny preset); random: paper size, random init; pretrained: paper size from the official initialisation."),
        click.Option(["--preset"], type=click.Choice(sorted(cls.presets)), default=None, help="Model size + training defaults (default: tiny for --weights tiny, else paper)."),
        click.Option(["--model"], default=None, help="Hub id or local directory for --weights pretrained (default: the plugin's)."),
        click.Option(["--split"], default="train", show_default=True),
        click.Option(["--max-steps", "max_steps"], type=int, default=None, help=preset("max_steps", "Optimizer steps.")),
        click.Option(["--batch-size", "batch_size"], type=int, default=None, help=preset("batch_size", "Per-process batch size.")),
        click.Option(["--lr", "learning_rate"], type=float, default=None, help=preset("learning_rate", "Learning rate.")),
        click.Option(["--warmup-steps", "warmup_steps"], type=int, default=None, help=preset("warmup_steps", "Warm-up steps.")),
        click.Option(["--lr-schedule", "lr_schedule"], type=click.Choice(LR_SCHEDULES), default=None, help=preset("lr_schedule", "Learning-rate schedule.")),
        click.Option(["--weight-decay", "weight_decay"], type=float, default=None, help=preset("weight_decay", "AdamW weight decay.")),
        click.Option(["--max-grad-norm", "max_grad_norm"], type=float, default=None, help=preset("max_grad_norm", "Gradient clipping.")),
        click.Option(["--grad-accum", "gradient_accumulation"], type=int, default=None, help=preset("gradient_accumulation", "Gradient accumulation steps.")),
        click.Option(["--mixed-precision", "mixed_precision"], type=click.Choice(MIXED_PRECISION), default=None, help=preset("mixed_precision", "Mixed precision.")),
        click.Option(["--seed"], type=int, default=None, help=preset("seed", "Seed of the data order, dropout and noise.")),
        click.Option(["--resume"], is_flag=False, flag_value="latest", default=None, help="Continue from the newest checkpoint (`--resume` or `--resume latest`) or from a checkpoint directory."),
        click.Option(["--checkpoint-every", "checkpoint_every"], type=int, default=None, help=preset("checkpoint_every", "Steps between checkpoints.")),
        click.Option(["--log-every", "log_every"], type=int, default=None, help=preset("log_every", "Steps between log flushes.")),
        click.Option(["--num-workers"], type=int, default=0, show_default=True, help="DataLoader worker processes."),
        click.Option(["--overwrite"], is_flag=True, help="Start over: remove the run's own checkpoints, config and logs at --out first (nothing else there)."),
        click.Option(["--ema-decay", "ema_decay"], type=float, default=None, help="Keep an EMA of the weights with this decay (e.g. 0.9999), saved as checkpoint-<step>/ema/."),
        click.Option(["--gradient-checkpointing/--no-gradient-checkpointing", "gradient_checkpointing"], default=None, help="Recompute activations in backward (less memory, slower)."),
        click.Option(["--attention"], type=click.Choice(ATTENTION_MODES), default=None, help=preset("attention", "sdpa: torch scaled_dot_product_attention on every diffusers attention layer; keep: as the model built it.")),
        click.Option(["--skip-corrupt-shards", "skip_corrupt"], is_flag=True, help="Skip shards that cannot be read (corrupt, truncated, missing, keys out of line) with a warning naming each, instead of stopping."),
        click.Option(["--storage-options"], default=None, help=STORAGE_OPTIONS_HELP),
        *_plugin_options(cls.train_options),
    ]
    extra = [o.name for o in cls.train_options]

    def run(shards, out, storage_options, resume, **kw) -> None:
        from posedata.train.run import run_training

        options = {k: kw.pop(k) for k in extra}
        changes = {k: v for k, v in kw.items() if v is not None}
        try:
            summary = run_training(name, shards, out, storage_options=parse_storage_options(storage_options), resume=resume or False,
                                   options=options, **changes)
        except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
            raise click.ClickException(str(e).strip("'\"")) from None
        if os.environ.get("RANK", "0") == "0":  # under `accelerate launch`, once
            click.echo(json.dumps(summary, indent=2, default=str))

    return click.Command(name, params=params, callback=run, short_help=_plugin_summary(cls),
                         help=f"{_plugin_summary(cls)}\n\nReads: {', '.join(n if isinstance(n, str) else ' or '.join(n) for n in cls.needs)}.")


def _sample_options() -> list:
    from posedata.train.config import SCHEDULER_NAMES

    return [
        click.Option(["--shards"], required=True, help="Dataset made by `posedata build` (path or fsspec URL)."),
        click.Option(["--out"], required=True, help="Folder for the outputs, samples.parquet and the contact sheet."),
        click.Option(["--split"], default="test", show_default=True),
        click.Option(["-n", "--limit", "--count", "limit"], type=int, default=8, show_default=True, help="Pairs to sample (the first of the split's pair table)."),
        click.Option(["--batch-size"], type=int, default=4, show_default=True),
        click.Option(["--steps", "num_inference_steps"], type=int, default=None, help="Denoising steps (default: the recipe's)."),
        click.Option(["--guidance", "guidance_scale"], type=float, default=None, help="Classifier-free guidance scale; <= 1: none (default: the recipe's)."),
        click.Option(["--guidance-rescale", "guidance_rescale"], type=float, default=None, help="Guidance rescale (default: the recipe's)."),
        click.Option(["--scheduler"], type=click.Choice(SCHEDULER_NAMES), default=None, help="Sampler (default: the recipe's)."),
        click.Option(["--seed"], type=int, default=42, show_default=True, help="Same seed, same pixels."),
        click.Option(["--storage-options"], default=None, help=STORAGE_OPTIONS_HELP),
    ]


def _sample_command(name: str, cls) -> click.Command:
    recipes = ", ".join(f"{k}: {v.scheduler} {v.num_inference_steps} steps, guidance {v.guidance_scale}" for k, v in cls.sample_recipes.items())
    params = [
        *_sample_options(),
        click.Option(["--run"], required=True, help=f"{name} run directory (its newest checkpoint) or a checkpoint."),
        click.Option(["--recipe"], type=click.Choice(list(cls.sample_recipes)), default=None, help=f"Sampling settings ({recipes}); the first is the default."),
        *_plugin_options(cls.sample_options),
    ]
    extra = [o.name for o in cls.sample_options]

    def run(shards, out, run, storage_options, **kw) -> None:
        from posedata.train.sample import sample_plugin

        options = {k: kw.pop(k) for k in extra}
        try:
            summary = sample_plugin(name, shards, run, out, storage_options=parse_storage_options(storage_options), echo=click.echo,
                                    options=options, **kw)
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise click.ClickException(str(e).strip("'\"")) from None
        click.echo(json.dumps(summary, indent=2))

    return click.Command(name, params=params, callback=run, short_help=_plugin_summary(cls),
                         help=f"Sample a trained {name} run on a split's pairs: one output per pair, samples.parquet, sheet.png.")


@main.group(cls=PluginCommands, make_command=_train_command)
def train() -> None:
    """Train a plugin from precomputed features: `posedata train PLUGIN --shards URL --out DIR`.
    `posedata train PLUGIN --help` shows its options and defaults."""


@main.group(cls=PluginCommands, make_command=_sample_command)
def sample() -> None:
    """Sample trained runs on a split's pairs: `posedata sample PLUGIN --run RUN ...`, or the
    PCDMs chain `posedata sample pcdm --prior RUN --inpaint RUN --refine RUN`. Every command
    writes OUT/samples.parquet (source_key, target_key, file) and OUT/sheet.png."""


def _parse_stage_settings(values: tuple[str, ...]) -> dict[str, dict]:
    """`--set refine.guidance_rescale=0` -> {"refine": {"guidance_rescale": 0.0}}."""
    from posedata.train.config import SampleSettings

    kinds = {"num_inference_steps": int, "guidance_scale": float, "guidance_rescale": float, "scheduler": str, "uncond": str}
    assert set(kinds) == set(SampleSettings.__dataclass_fields__)
    out: dict[str, dict] = {}
    for key, value in parse_assignments(values, "STAGE.SETTING=VALUE").items():
        stage, _, setting = key.partition(".")
        if setting not in kinds:
            raise click.BadParameter(f"--set {key}: the settings are {', '.join(kinds)}")
        try:
            out.setdefault(stage, {})[setting] = kinds[setting](value)
        except ValueError:
            raise click.BadParameter(f"--set {key}={value}: not a {kinds[setting].__name__}") from None
    return out


@sample.command("pcdm", params=_sample_options())
@click.option("--prior", default=None, help="pcdm-prior run directory (or checkpoint).")
@click.option("--inpaint", default=None, help="pcdm-inpaint run directory (or checkpoint).")
@click.option("--refine", default=None, help="pcdm-refine run directory (or checkpoint).")
@click.option("--recipe", type=click.Choice(["official", "paper"]), default="official", show_default=True, help="official: each stage as the official test scripts (prior UnCLIP 20 steps, no guidance; inpaint UniPC 20, w 2, zero unconditional embeddings; refine the same + guidance rescale 2); paper: DDIM 50 steps, w = 2 for every stage.")
@click.option("--set", "stage_settings", multiple=True, help="STAGE.SETTING=VALUE: one stage's setting, e.g. refine.guidance_rescale=0 or prior.scheduler=ddim (settings: num_inference_steps, guidance_scale, guidance_rescale, scheduler, uncond).")
def sample_pcdm(shards, out, storage_options, stage_settings, **kw) -> None:
    """The PCDMs chain: prior -> inpaint -> refine; any stage can run alone. Writes one output
    per pair and stage, samples.parquet (file = the last stage's) and a contact sheet
    (source | target pose | coarse | refined | truth). --steps/--guidance/--scheduler apply
    to every stage; --set to one."""
    from posedata.train.sample import sample_pcdm as run_sample

    try:
        summary = run_sample(shards, out, storage_options=parse_storage_options(storage_options), echo=click.echo,
                             stage_settings=_parse_stage_settings(stage_settings), **kw)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise click.ClickException(str(e).strip("'\"")) from None
    click.echo(json.dumps(summary, indent=2))


# ---- evaluation -------------------------------------------------------------------------------


@main.command("eval")
@click.argument("samples_dir")
@click.option("--shards", required=True, help="The dataset the samples were made from (its stored images are the ground truth).")
@click.option("--protocol", type=click.Choice(["pcdms", "cfld", "pidm", "gfla", "patn"]), default="pcdms", show_default=True, help="Whose official metric script to follow (see the README: numbers of different protocols are not comparable).")
@click.option("--metrics", default=None, help="Comma-separated: ssim,psnr,lpips,fid,fid_tf,mask_ssim,mask_lpips,is,mask_is (default: what the protocol's papers report, plus fid_tf when the dataset has its reference).")
@click.option("--weights", type=click.Choice(["pretrained", "random"]), default="pretrained", show_default=True, help="pretrained: LPIPS / Inception weight files from $TORCH_HOME/hub/checkpoints (never downloaded); random: seeded random networks (tests, CI).")
@click.option("--split", default="test", show_default=True, help="The split every target must be in.")
@click.option("--reference-split", default="train", show_default=True, help="The split whose fid_ref features are FID's reference.")
@click.option("--seed", default=0, show_default=True, help="Seed of --weights random (must match the fid_ref feature's).")
@click.option("--sheet-pairs", default=4, show_default=True, help="Best and worst pairs drawn in metrics_sheet.png.")
@click.option("--storage-options", default=None, help=STORAGE_OPTIONS_HELP)
def eval_command(samples_dir, shards, metrics, storage_options, **kw) -> None:
    """SSIM, PSNR, LPIPS, FID of SAMPLES_DIR/samples.parquet as a paper computes them; writes
    metrics.json and metrics_sheet.png (best / worst pairs: source | generated | truth)."""
    from posedata.eval.run import evaluate

    wanted = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    evaluate(samples_dir, shards, metrics=wanted, storage_options=parse_storage_options(storage_options), echo=click.echo, **kw)


if __name__ == "__main__":
    main()
