"""What other tools need to read a posedata dataset without posedata: the dataset card for
Hugging Face `datasets` and the Hub (`README.md` with YAML `configs:`), and one wids shard
index per folder and split.

- **`README.md`**: one config per folder users read: `base` (the base shards, the default)
  and each feature folder `name@fingerprint`, plus `name` where only one folder has that
  name and `name-preset` where only one has that preset (HF config names cannot hold a
  colon), each with `data_files` per split. `load_dataset(root, "clip")` then reads
  `features/clip@<fp>/<split>-*.tar` as the `train` / `test` splits, streaming included. The
  card also says what each member holds, how to decode fp8 / bf16 members with numpy, how to
  join a feature to the base by `__key__`, and the license, citation and terms of the
  source photos. The tables (`manifest.parquet`, `pairs/`) are not configs: HF builds every
  config of one card with one loader, and those are Parquet, not WebDataset.
- **`meta/.../<split>.wids.json`**: `wids.ShardListDataset(index)`; shard URLs are relative
  to the index file, as wids resolves them, so the dataset can be copied or served from a
  bucket unchanged.

The card is regenerated whenever `dataset.json` changes (build, extend). A `README.md` that
posedata did not write (no `GENERATED_MARK` in it) is left alone.
"""

from __future__ import annotations

import json
import logging
import posixpath
from typing import Any

from posedata.layout import HUB_CARD, DatasetLocation
from posedata.storage import BF16_DECODE, FP8_DECODE

log = logging.getLogger("posedata.interop")

BASE_CONFIG = "base"
GENERATED_MARK = "<!-- written by posedata from dataset.json; posedata rewrites this file when the dataset changes -->"
KEEP_HINT = "<!-- to edit this card by hand, delete the line above: posedata then leaves README.md as it is -->"
WIDS_KIND = "wids-shard-index-v1"

# What a user of each source must respect, and how to cite it. The photos keep their own
# terms; posedata's features derive from them and from the models named per feature.
SOURCE_TERMS: dict[str, dict[str, str]] = {
    "deepfashion": {
        "title": "DeepFashion In-Shop Clothes Retrieval",
        "homepage": "http://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html",
        "license": "other",
        "license_name": "deepfashion-research-only",
        "terms": (
            "The DeepFashion images are released by the Multimedia Laboratory of The Chinese University of Hong Kong "
            "for non-commercial research and educational purposes only, under the agreement you accepted to download them; "
            "the images are not to be redistributed, and that agreement applies to this dataset, which holds resized copies "
            "and features computed from them. The train/test lists and pairs come from the pose transfer papers' repositories."
        ),
        "citation": (
            "@inproceedings{liu2016deepfashion,\n"
            "  title = {DeepFashion: Powering Robust Clothes Recognition and Retrieval with Rich Annotations},\n"
            "  author = {Liu, Ziwei and Luo, Ping and Qiu, Shi and Wang, Xiaogang and Tang, Xiaoou},\n"
            "  booktitle = {Proceedings of IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},\n"
            "  year = {2016}\n"
            "}"
        ),
    },
    "market1501": {
        "title": "Market-1501",
        "homepage": "http://www.liangzheng.org/Project/project_reid.html",
        "license": "other",
        "license_name": "market1501-terms",
        "terms": (
            "The Market-1501 images belong to their authors and are available for research under the terms you accepted "
            "to obtain them; those terms apply to this dataset, which holds resized copies and features computed from "
            "them. Do not redistribute it beyond what they allow."
        ),
        "citation": (
            "@inproceedings{zheng2015scalable,\n"
            "  title = {Scalable Person Re-identification: A Benchmark},\n"
            "  author = {Zheng, Liang and Shen, Liyue and Tian, Lu and Wang, Shengjin and Wang, Jingdong and Tian, Qi},\n"
            "  booktitle = {IEEE International Conference on Computer Vision (ICCV)},\n"
            "  year = {2015}\n"
            "}"
        ),
    },
}
FOLDER_TERMS = {
    "title": "a folder of photos",
    "license": "unknown",
    "terms": (
        "The photos come from a folder the builder named; their own license and the consent of the people shown apply. "
        "Say which before sharing the dataset (edit this card as the comment at its top says)."
    ),
    "citation": "",
}


# ---- wids ---------------------------------------------------------------------------------------


def write_wids_indexes(location: DatasetLocation, card: dict[str, Any], shard_samples: dict[str, int], folders: list[str | None]) -> list[str]:
    """One wids index per folder (None: the base shards) and split of `card`, with each
    shard's sample count from `shard_samples` and its size; returns the paths written."""
    # no "name": wids names a dataset by its URL, and the file stays the same wherever the
    # dataset is copied (a bucket and a local build write the same bytes)
    written = []
    for folder in folders:
        for split, info in card["splits"].items():
            shards = list(info.get("shards") or [])
            if not shards:
                continue
            index = location.wids_index(folder, split)
            shardlist = []
            for shard in shards:
                path = location.base_shard(shard) if folder is None else location.sidecar(folder, shard)
                shardlist.append({"url": posixpath.relpath(path, posixpath.dirname(index)), "nsamples": int(shard_samples.get(shard, 0)), "filesize": location.size(path)})
            location.write_json(index, {"__kind__": WIDS_KIND, "wids_version": 1, "shardlist": shardlist})
            written.append(index)
    return written


# ---- the dataset card ---------------------------------------------------------------------------


def hub_configs(card: dict[str, Any]) -> list[dict[str, Any]]:
    """The card's `configs:`: base first (the default), then one per feature folder, then
    the unambiguous short names (`clip`, `vae-sd15`) of the folders."""

    def data_files(directory: str) -> list[dict[str, str]]:
        return [{"split": split, "path": f"{directory}/{split}-*.tar"} for split, info in card["splits"].items() if info.get("shards")]

    configs = [{"config_name": BASE_CONFIG, "default": True, "data_files": data_files("shards")}]
    features = card.get("features", {})
    for folder in features:
        configs.append({"config_name": folder, "data_files": data_files(f"features/{folder}")})
    for alias, folder in short_names(features).items():
        configs.append({"config_name": alias, "data_files": data_files(f"features/{folder}")})
    return configs


def short_names(features: dict[str, Any]) -> dict[str, str]:
    """{alias: folder} for each feature name (and name-preset) that only one folder has."""
    candidates: dict[str, list[str]] = {}
    for folder, feature in features.items():
        name = feature.get("name") or folder.split("@")[0]
        candidates.setdefault(name, []).append(folder)
        if feature.get("preset"):
            candidates.setdefault(f"{name}-{feature['preset']}", []).append(folder)
    return {alias: folders[0] for alias, folders in sorted(candidates.items()) if len(folders) == 1 and alias != BASE_CONFIG}


def render_hub_card(card: dict[str, Any]) -> str:
    """README.md for `card` (a dataset.json): YAML front matter, then the text."""
    from huggingface_hub import DatasetCardData

    source = card.get("source", {})
    terms = SOURCE_TERMS.get(source.get("name"), FOLDER_TERMS)
    metadata: dict[str, Any] = {"license": terms["license"]}
    if terms.get("license_name"):
        metadata.update(license_name=terms["license_name"], license_link=terms["homepage"])
    data = DatasetCardData(
        pretty_name=f"{card.get('name', 'posedata dataset')} (posedata)",
        tags=["posedata", "pose-guided-person-image-synthesis", "webdataset"],
        configs=hub_configs(card),
        **metadata,
    )
    return f"---\n{data.to_yaml()}\n---\n{GENERATED_MARK}\n{KEEP_HINT}\n\n{_body(card, terms)}"


def write_hub_card(location: DatasetLocation, card: dict[str, Any]) -> bool:
    """Write README.md from `card`, unless a README.md posedata did not write is there."""
    path = location.path(HUB_CARD)
    if location.exists(path) and GENERATED_MARK not in location.read_bytes(path).decode("utf-8", "replace"):
        log.warning("%s was not written by posedata: left as it is (the dataset card for HF datasets is not updated)", location.url_of(path))
        return False
    location.write_bytes(path, render_hub_card(card).encode())
    return True


def _body(card: dict[str, Any], terms: dict[str, str]) -> str:
    height, width = card["resolution"]
    source = card.get("source", {})
    splits = card.get("splits", {})
    features = card.get("features", {})
    aliases: dict[str, list[str]] = {}
    for alias, folder in short_names(features).items():
        aliases.setdefault(folder, []).append(alias)
    counts = ", ".join(f"{split} {info.get('samples', 0)} images / {info.get('pairs', 0)} pairs" for split, info in splits.items())
    example = next(iter(aliases.values()), [next(iter(features), BASE_CONFIG)])[0] if features else BASE_CONFIG
    lines = [
        f"# {card.get('name', 'dataset')}",
        "",
        f"Features for pose-guided person image synthesis, computed once by posedata "
        f"{card.get('posedata_version', '')} from {terms['title']} (source `{source.get('name', '?')}` at `{source.get('root', '?')}`), "
        f"stored at {height}x{width} (height x width): {counts}. Dataset format {card.get('format_version', 1)}; "
        "`dataset.json` is the full machine-readable card.",
        "",
        "## Configs",
        "",
        "Each config is one folder of WebDataset shards (`<split>-NNNNNN.tar`, one split per file prefix). "
        "All folders hold the same keys in the same order, shard by shard.",
        "",
        "| config | folder | per sample |",
        "|---|---|---|",
        f"| `{BASE_CONFIG}` (default) | `shards/` | `jpg`: the stored image (JPEG q95, 4:4:4); `json`: key, split, group, source path (relative to the source root), original size |",
    ]
    for folder, feature in features.items():
        names = ", ".join(f"`{n}`" for n in [folder, *aliases.get(folder, [])])
        lines.append(f"| {names} | `features/{folder}/` | {_members_text(feature)}; model `{feature.get('model', '?')}` |")
    lines += [
        "",
        "## Reading it without posedata",
        "",
        "```python",
        "from datasets import load_dataset, concatenate_datasets",
        f'base = load_dataset(ROOT, "{BASE_CONFIG}", split="train")      # ROOT: this folder (or an hf:// / s3:// URL)',
        f'feature = load_dataset(ROOT, "{example}", split="train")   # streaming=True works too',
        "# Join a feature to the base by __key__: the shards are aligned, so the rows are in the same order.",
        'assert base["__key__"] == feature["__key__"]',
        'both = concatenate_datasets([base, feature.remove_columns(["__key__", "__url__"])], axis=1)',
        "```",
        "",
        "With other tools: `ray.data.read_webdataset(\"features/<folder>\")`; "
        "`wids.ShardListDataset(\"meta/features/<folder>/train.wids.json\")` (`meta/shards/train.wids.json` for the base; "
        "index i is the same key in every folder); `webdataset.WebDataset(\"features/<folder>/train-{000000..000009}.tar\")`. "
        "Tables (Parquet; DuckDB, pandas, pyarrow): `manifest.parquet` (key, split, group, shard, index, source_path relative "
        "to the source root, source_sha256, original size), `pairs/<split>.parquet` (split, source_key, target_key, shard), "
        "`rejects.parquet` (every input that was not kept, with the reason).",
        "",
        "Arrays are `.npy` (load with `allow_pickle=False`). numpy has neither fp8 nor bfloat16, so those are stored as bit patterns:",
        "",
        f"- fp8 (`<name>.e4m3.npy` uint8 + `<name>.scale.npy` float32 [1]): `{FP8_DECODE}`",
        f"- bf16 (`<name>.bf16.npy` uint16): `{BF16_DECODE}`",
        "",
        "(with torch: `torch.from_numpy(bits).view(torch.float8_e4m3fn).float() * scale[0]`, `torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)`)",
        "",
        "## License, terms and citation",
        "",
        terms["terms"],
        "",
        "Features computed by a model are also subject to that model's license (the model of each feature is listed above).",
    ]
    if terms.get("citation"):
        lines += ["", "```bibtex", terms["citation"], "```"]
    return "\n".join(lines) + "\n"


def _members_text(feature: dict[str, Any]) -> str:
    parts = []
    for suffix, output in (feature.get("outputs") or {}).items():
        shape = json.dumps(output.get("shape", [])).replace('"', "")
        if output.get("members"):
            stored = " + ".join(f"`{m}` {d.get('dtype')} {json.dumps(d.get('shape', [])).replace(chr(34), '')}" for m, d in output["members"].items())
            parts.append(f"`{suffix.removesuffix('.npy')}` {output.get('precision')} {shape} as {stored}")
        else:
            parts.append(f"`{suffix}` {output.get('dtype')} {shape}")
    return "; ".join(parts)
