"""`posedata verify URL`: re-read every file of a dataset and check it against the manifest
and the card.

What is checked (on any fsspec URL):

- `dataset.json` is there and parses; its counts agree with the tables.
- `manifest.parquet`, `rejects.parquet`, `pairs/<split>.parquet`, `_done/build.json`,
  `_done/scan.parquet` read; manifest keys are unique, every manifest shard is a shard of the
  card, each shard's `index` column runs 0..n-1; samples per split and pairs per split equal
  the card's; pair keys are in the manifest and their `shard` column is right.
- Every shard: the base tar is there; its samples are exactly the manifest's keys of that
  shard, in the manifest's order; every `.jpg` decodes to an image of the card's resolution,
  every `.json` parses; the done marker `_done/shards/<shard>.parquet` is there and lists the
  same keys.
- Every feature folder of the card (or those named with `features=`): the folder name is
  `name@fingerprint` of the card, the fingerprint is the hash of the recorded fingerprint
  inputs, `features/<folder>/feature.json` (when present) agrees; one sidecar per shard with
  the same keys in the same order; every output the card lists is there for every sample and
  decodes (`.npy` with `allow_pickle=False`, packed bf16 / fp8 included; `.png`), with the
  card's dtype (bfloat16 / float8_e4m3fn outputs decode to float32) and the card's shape
  where it is concrete (H, W, H/4, W/4 ... resolve from the card's resolution; other symbols
  such as M are free but must agree between the outputs of one sample); float arrays hold
  no NaN or inf. Null embeddings decode and are finite. Features added by `posedata extend`
  have a done marker per shard.
- Format 2 (posedata.layout): feature folders and `shards/` hold only shards; every folder
  has a wids index per split (`meta/.../<split>.wids.json`) whose shards, sample counts and
  sizes are right; `README.md` (the dataset card for HF datasets) names every folder;
  `manifest.parquet` holds no absolute source path; `pairs/` tables carry their split. fp8 /
  bf16 outputs are the plain-numeric members the card lists (`embeds.e4m3.npy` uint8 +
  `embeds.scale.npy`, `embeds.bf16.npy` uint16).
- No `.tmp-*` files are left over from an interrupted write, and no feature folder or
  sidecar exists that the card does not know of.

Every problem names the file (as a URL), the shard and the sample key where there is one.
"""

from __future__ import annotations

import collections
import io
import math
import posixpath
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from posedata.extend import feature_done_marker
from posedata.layout import CARD, DONE, FEATURE_CARD, HUB_CARD, MANIFEST, META, REJECTS, DatasetLocation
from posedata.shards import MANIFEST_SCHEMA, decode_output, decode_stored_output
from posedata.storage import decode_float, is_bf16_bits, is_fp8

# More problems than this in one file are counted, not listed.
MAX_PROBLEMS_PER_FILE = 20


class Problem(NamedTuple):
    url: str  # the file, as a URL
    shard: str  # "" when the problem is not about one shard
    key: str  # "" when the problem is not about one sample
    message: str


@dataclass
class VerifyReport:
    url: str
    problems: list[Problem] = field(default_factory=list)
    # files / members checked, per kind ("base shards", "sidecars", "arrays", ...)
    checked: collections.Counter = field(default_factory=collections.Counter)
    # problems not listed because a file had more than MAX_PROBLEMS_PER_FILE, by file URL
    more: collections.Counter = field(default_factory=collections.Counter)
    _listed: collections.Counter = field(default_factory=collections.Counter, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.more

    def add(self, url: str, shard: str, key: str, message: str) -> None:
        if self._listed[url] >= MAX_PROBLEMS_PER_FILE:
            self.more[url] += 1
            return
        self._listed[url] += 1
        self.problems.append(Problem(url, shard, key, message))


def verify(
    url: str,
    storage_options: dict[str, Any] | None = None,
    features: Sequence[str] | None = None,
    progress: bool = True,
) -> VerifyReport:
    """Check every file of the dataset at `url`; `features` (names, `name:preset` or
    `name@fp`) limits the feature folders checked (default: all of the card's)."""
    return _Verifier(DatasetLocation(url, storage_options or {}), features, progress).run()


# The order format_report lists the counts in.
KINDS = ("card", "tables", "json files", "done markers", "features", "null embeddings", "base shards", "images", "metadata", "sidecars", "arrays")


def format_report(report: VerifyReport) -> str:
    kinds = [k for k in KINDS if report.checked.get(k)] + [k for k in report.checked if k not in KINDS and report.checked[k]]
    checked = f" (checked {', '.join(f'{report.checked[k]} {k}' for k in kinds)})" if kinds else ""
    if report.ok:
        return f"posedata verify {report.url}: OK{checked}"
    total = len(report.problems) + sum(report.more.values())
    lines = [f"posedata verify {report.url}: {total} problem{'s' if total != 1 else ''}{checked}"]
    by_file: dict[str, list[Problem]] = collections.defaultdict(list)
    for p in report.problems:
        by_file[p.url].append(p)
    for file_url, problems in by_file.items():
        shards = sorted({p.shard for p in problems if p.shard})
        lines.append(f"  {file_url}" + (f"  (shard {', '.join(shards)})" if shards else ""))
        for p in problems:
            lines.append(f"    {p.key + ': ' if p.key else ''}{p.message}")
        if report.more.get(file_url):
            lines.append(f"    ... and {report.more[file_url]} more problems in this file")
    return "\n".join(lines)


# ---- the checks -----------------------------------------------------------------------------


class _Verifier:
    def __init__(self, location: DatasetLocation, features: Sequence[str] | None, progress: bool):
        self.location = location
        self.only = list(features) if features else None
        self.progress = progress
        self.report = VerifyReport(location.url)
        self.card: dict[str, Any] = {}
        self.height = self.width = 0

    # -- helpers --

    def url(self, path: str) -> str:
        return self.location.url_of(path)

    def problem(self, path: str, message: str, shard: str = "", key: str = "") -> None:
        self.report.add(self.url(path), shard, key, message)

    def exists(self, path: str) -> bool:
        return path in self.listing or self.location.exists(path)

    def read_table(self, path: str, what: str, kind: str = "tables", shard: str = ""):
        if not self.exists(path):
            self.problem(path, f"missing ({what})", shard)
            return None
        try:
            table = self.location.read_parquet(path)
        except Exception as e:
            self.problem(path, f"cannot read as Parquet: {_short(e)}", shard)
            return None
        self.report.checked[kind] += 1
        return table

    def read_json(self, path: str, what: str, kind: str = "json files", shard: str = ""):
        if not self.exists(path):
            self.problem(path, f"missing ({what})", shard)
            return None
        try:
            value = self.location.read_json(path)
        except Exception as e:
            self.problem(path, f"cannot read as JSON: {_short(e)}", shard)
            return None
        self.report.checked[kind] += 1
        return value

    # -- the run --

    def run(self) -> VerifyReport:
        loc = self.location
        card_path = loc.path(CARD)
        try:
            self.listing = set(loc.fs.find(loc.root)) if loc.fs.exists(loc.root) else set()
        except Exception:
            self.listing = set()
        if not self.listing and not loc.exists(loc.root):
            self.problem(loc.root, "nothing here (no dataset at this URL)")
            return self.report
        card = self.read_json(card_path, "the card: a dataset is complete only once it is written", kind="card")
        if card is None:
            self.check_leftovers()
            return self.report
        self.card = card
        if not self.check_card_fields(card_path):
            return self.report
        self.height, self.width = (int(v) for v in card["resolution"])
        self.format = card.get("format_version", 1)

        shard_split = {shard: split for split, info in card["splits"].items() for shard in info.get("shards", [])}
        manifest_keys = self.check_tables(shard_split)
        folders = self.feature_folders()
        extended = self.extended_folders(folders)
        for folder in folders:
            self.check_feature_folder(folder)
        self.check_peer_files(shard_split, manifest_keys, folders)

        from tqdm.auto import tqdm

        for shard in tqdm(list(shard_split), desc="verify", unit="shard", disable=not self.progress):
            expected = manifest_keys.get(shard, []) if manifest_keys is not None else None
            self.check_marker(shard, expected)
            self.check_tar(loc.base_shard(shard), shard, expected, None)
            for folder in folders:
                if folder not in self.card["features"]:
                    continue
                self.check_tar(loc.sidecar(folder, shard), shard, expected, folder)
                if folder in extended:
                    marker = feature_done_marker(loc, folder, shard)
                    done = self.read_json(marker, f"done marker of shard {shard} of {folder}, added by `posedata extend`", kind="done markers", shard=shard)
                    if done is not None and expected is not None and done.get("samples") != len(expected):
                        self.problem(marker, f"says {done.get('samples')} samples, the manifest lists {len(expected)}", shard)
        self.check_leftovers(shard_split)
        return self.report

    def check_card_fields(self, card_path: str) -> bool:
        missing = [k for k in ("resolution", "splits", "features") if k not in self.card]
        if missing:
            self.problem(card_path, f"no {', '.join(missing)}: not a posedata card")
            return False
        resolution = self.card["resolution"]
        if not (isinstance(resolution, list) and len(resolution) == 2 and all(isinstance(v, int) and v > 0 for v in resolution)):
            self.problem(card_path, f"resolution {resolution!r} is not [H, W]")
            return False
        for split, info in self.card["splits"].items():
            for shard in info.get("shards", []):
                if not str(shard).startswith(f"{split}-"):
                    self.problem(card_path, f"split {split!r} lists shard {shard!r}", shard)
        return True

    def check_tables(self, shard_split: dict[str, str]) -> dict[str, list[str]] | None:
        """Manifest, rejects, pairs, build settings; returns each shard's keys in index order
        (None when the manifest cannot be read: the shards' keys are then not compared)."""
        loc, card = self.location, self.card
        card_path = loc.path(CARD)
        manifest_path = loc.path(MANIFEST)
        manifest = self.read_table(manifest_path, "one row per sample")
        rejects = self.read_table(loc.path(REJECTS), "one row per rejected input")
        self.read_table(loc.path(DONE, "scan.parquet"), "rejects found while scanning")
        self.read_json(loc.path(DONE, "build.json"), "the build settings")
        by_shard: dict[str, list[str]] = {}
        if manifest is None:
            return None
        absent = [c for c in MANIFEST_SCHEMA.names if c not in manifest.column_names]
        if absent:
            self.problem(manifest_path, f"no column {', '.join(absent)}")
            return None
        keys = manifest["key"].to_pylist()
        if self.format >= 2:
            absolute = [(k, p) for k, p in zip(keys, manifest["source_path"].to_pylist()) if p and (p.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", p))]
            for key, source_path in absolute[:MAX_PROBLEMS_PER_FILE]:
                self.problem(manifest_path, f"source_path {source_path!r} is absolute (a path of the building machine; format 2 stores it relative to the source root)", key=key)
        splits = manifest["split"].to_pylist()
        shards = manifest["shard"].to_pylist()
        indexes = manifest["index"].to_pylist()
        statuses = manifest["status"].to_pylist()
        for key, n in collections.Counter(keys).items():
            if n > 1:
                self.problem(manifest_path, f"key appears {n} times", key=key)
        rows: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
        for key, split, shard, index, status in zip(keys, splits, shards, indexes, statuses):
            if shard not in shard_split:
                self.problem(manifest_path, f"in shard {shard!r}, which dataset.json does not list", shard, key)
                continue
            if split != shard_split[shard]:
                self.problem(manifest_path, f"split {split!r}, but its shard is in split {shard_split[shard]!r}", shard, key)
            if status != "ok":
                self.problem(manifest_path, f"status {status!r} (the manifest holds written samples only)", shard, key)
            rows[shard].append((index, key))
        for shard, items in rows.items():
            items.sort(key=lambda t: (t[0] is None, t[0] if t[0] is not None else 0))
            if [i for i, _ in items] != list(range(len(items))):
                self.problem(manifest_path, f"index column of shard {shard} is {[i for i, _ in items][:10]}..., not 0..{len(items) - 1}", shard)
            by_shard[shard] = [k for _, k in items]
        counted = collections.Counter(splits)
        for split, info in card["splits"].items():
            if info.get("samples") is not None and counted.get(split, 0) != info["samples"]:
                self.problem(manifest_path, f"{counted.get(split, 0)} samples in split {split!r}, dataset.json says {info['samples']}")
        for split in counted:
            if split not in card["splits"]:
                self.problem(manifest_path, f"{counted[split]} samples in split {split!r}, which dataset.json does not list")
        counts = card.get("counts", {})
        if "written" in counts and counts["written"] != len(keys):
            self.problem(card_path, f"counts.written is {counts['written']}, the manifest has {len(keys)} rows")
        if rejects is not None and "rejected" in counts and counts["rejected"] != len(rejects):
            self.problem(card_path, f"counts.rejected is {counts['rejected']}, rejects.parquet has {len(rejects)} rows")

        shard_of = dict(zip(keys, shards))
        split_of = dict(zip(keys, splits))
        for split, info in card["splits"].items():
            path = loc.path("pairs", f"{split}.parquet")
            table = self.read_table(path, f"the pairs of split {split!r}")
            if table is None:
                continue
            absent = [c for c in ("source_key", "target_key", "shard") + (("split",) if self.format >= 2 else ()) if c not in table.column_names]
            if absent:
                self.problem(path, f"no column {', '.join(absent)}")
                continue
            if "split" in table.column_names:
                other = sorted({v for v in table["split"].to_pylist() if v != split}, key=str)
                if other:
                    self.problem(path, f"split column holds {', '.join(map(repr, other))}, not only {split!r}")
            if info.get("pairs") is not None and len(table) != info["pairs"]:
                self.problem(path, f"{len(table)} pairs, dataset.json says {info['pairs']}")
            for a, b, shard in zip(table["source_key"].to_pylist(), table["target_key"].to_pylist(), table["shard"].to_pylist()):
                for k in (a, b):
                    if k not in shard_of:
                        self.problem(path, f"pair ({a}, {b}): {k} is not in the manifest", shard or "", k)
                    elif split_of[k] != split:
                        self.problem(path, f"pair ({a}, {b}): {k} is in split {split_of[k]!r}", shard or "", k)
                if a in shard_of and b in shard_of:
                    want = shard_of[a] if shard_of[a] == shard_of[b] else None
                    if shard != want:
                        self.problem(path, f"pair ({a}, {b}) says shard {shard!r}, the manifest puts it in {want!r}", shard or "", a)
        return by_shard

    def feature_folders(self) -> list[str]:
        from posedata.reader import find_feature

        card_path = self.location.path(CARD)
        if self.only is None:
            return list(self.card["features"])
        folders = []
        for name in self.only:
            try:
                found = find_feature(self.card, name)
            except KeyError as e:
                self.problem(card_path, str(e).strip("'\""))
                continue
            if not found:
                self.problem(card_path, f"no feature {name!r}; features here: {', '.join(self.card['features']) or 'none'}")
            elif found[0] not in folders:
                folders.append(found[0])
        return folders

    def extended_folders(self, folders: list[str]) -> set[str]:
        """Folders added by `posedata extend` (not by the build): those have done markers."""
        path = self.location.path(DONE, "build.json")
        try:
            built = set(self.location.read_json(path).get("features", {}).values())
        except Exception:
            # no build settings (reported already): expect markers where some exist
            return {f for f in folders if any(p.startswith(self.location.path(DONE, "features", f) + "/") for p in self.listing)}
        return {f for f in folders if f not in built}

    def check_feature_folder(self, folder: str) -> None:
        from posedata.extractors.base import fingerprint

        loc = self.location
        card_path = loc.path(CARD)
        feature = self.card["features"][folder]
        self.report.checked["features"] += 1
        name, fp = feature.get("name"), feature.get("fingerprint")
        if folder != f"{name}@{fp}":
            self.problem(card_path, f"feature {folder}: name {name!r} and fingerprint {fp!r} give the folder {name}@{fp}, not {folder}")
        if feature.get("folder", folder) != folder:
            self.problem(card_path, f"feature {folder}: records folder {feature.get('folder')!r}")
        if isinstance(feature.get("fingerprint_inputs"), dict):
            computed = fingerprint(feature["fingerprint_inputs"])
            if computed != fp:
                self.problem(card_path, f"feature {folder}: fingerprint {fp!r}, but its fingerprint inputs hash to {computed!r}")
        if not isinstance(feature.get("outputs"), dict) or not feature["outputs"]:
            self.problem(card_path, f"feature {folder}: no outputs listed")
        directory = loc.feature_dir(folder)
        if not any(p.startswith(directory + "/") for p in self.listing) and not loc.exists(directory):
            self.problem(directory, f"missing: dataset.json lists feature {folder}")
            return
        # feature.json and null embeddings: meta/features/<folder>/ (format 2) or, format 1,
        # inside the feature folder
        meta = loc.feature_meta(folder)
        for feature_json in (loc.feature_card(folder), loc.legacy_feature_card(folder)):
            if not self.exists(feature_json):
                continue
            recorded = self.read_json(feature_json, "the feature's card")
            if recorded is not None:
                for k in ("name", "fingerprint", "folder", "outputs"):
                    if k in recorded and recorded[k] != feature.get(k):
                        self.problem(feature_json, f"{k} is {recorded[k]!r}, dataset.json says {feature.get(k)!r}")
        nulls = sorted(p for p in self.listing if (p.startswith(meta + "/null.") or p.startswith(directory + "/null.")) and p.endswith(".npy"))
        for path in nulls:
            self.check_null(path, folder)
        if feature.get("fingerprint_inputs", {}).get("null_embedding") and not nulls:
            self.problem(meta if self.format >= 2 else directory, f"no null embedding (null.<output>.npy), though the card says it has one: {feature['fingerprint_inputs']['null_embedding']}")

    def check_peer_files(self, shard_split: dict[str, str], manifest_keys: dict[str, list[str]] | None, folders: list[str]) -> None:
        """The files other tools read a dataset by: one wids index per folder and split (shards
        and sample counts right; sizes are not compared: a damaged tar is the tar's problem) and README.md, the dataset card for HF datasets. Required from
        format 2 on; a format 1 dataset's indexes are checked where present."""
        loc = self.location
        counts = {shard: len(keys) for shard, keys in (manifest_keys or {}).items()}
        for folder in [None, *folders]:
            if folder is not None and folder not in self.card["features"]:
                continue
            for split, info in self.card["splits"].items():
                shards = list(info.get("shards") or [])
                index = loc.wids_index(folder, split)
                if not shards or (self.format < 2 and not self.exists(index)):
                    continue
                what = f"wids index of split {split!r} of " + (f"feature {folder}" if folder else "the base shards")
                value = self.read_json(index, what)
                if value is None:
                    continue
                listed = value.get("shardlist") if isinstance(value, dict) else None
                if not isinstance(listed, list):
                    self.problem(index, "no shardlist: not a wids index")
                    continue
                want = [loc.base_shard(s) if folder is None else loc.sidecar(folder, s) for s in shards]
                got = [posixpath.normpath(posixpath.join(posixpath.dirname(index), str(entry.get("url", "")))) for entry in listed]
                if got != want:
                    self.problem(index, f"lists {len(got)} shards ({', '.join(posixpath.basename(g) for g in got[:3])}...), the card {len(want)} of split {split!r}")
                    continue
                for shard, path, entry in zip(shards, want, listed):
                    if manifest_keys is not None and entry.get("nsamples") != counts.get(shard, 0):
                        self.problem(index, f"says {entry.get('nsamples')} samples in {posixpath.basename(path)}, the manifest {counts.get(shard, 0)}", shard)
        readme = loc.path(HUB_CARD)
        if self.format < 2 and not self.exists(readme):
            return
        if not self.exists(readme):
            self.problem(readme, "missing (the dataset card HF datasets reads: one config per folder)")
            return
        text = loc.read_bytes(readme).decode("utf-8", "replace")
        self.report.checked["card"] += 1
        from posedata.interop import GENERATED_MARK

        if GENERATED_MARK not in text:
            return  # the user's own README: theirs to keep right
        for folder in self.card["features"]:
            if f"features/{folder}/" not in text:
                self.problem(readme, f"no config for feature {folder} (run `posedata extend` or rebuild to rewrite it)")

    def check_null(self, path: str, folder: str) -> None:
        output = posixpath.basename(path)[len("null."):]
        try:
            data = self.location.read_bytes(path)
            stored = np.load(io.BytesIO(data), allow_pickle=False)
            value = decode_float(stored)
        except Exception as e:
            self.problem(path, f"null embedding does not decode: {_short(e)}")
            return
        self.report.checked["null embeddings"] += 1
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            self.problem(path, f"null embedding holds {_nonfinite(value)}")
        spec = self.card["features"][folder].get("outputs", {}).get(output)
        if spec and spec["shape"] and isinstance(spec["shape"][0], str) and len(spec["shape"]) == value.ndim + 1:
            # a per-item output ([M, D] region embeddings) has the null embedding of one item
            spec = dict(spec, shape=spec["shape"][1:])
        if spec and (spec.get("members") or spec.get("dtype") in ("bfloat16", "float8_e4m3fn")):
            # null embeddings are written as the extractor returns them, never as bit
            # patterns: a bf16 / fp8 feature's null embedding is a plain float array
            if value.dtype not in (np.float16, np.float32):
                self.problem(path, f"null embedding: dtype {value.dtype}, not float16 or float32")
            spec = dict(spec, dtype=None)
        if spec:
            for message in self.check_value(output, value, None, spec, {}):
                self.problem(path, f"null embedding: {message}")

    def check_marker(self, shard: str, expected: list[str] | None) -> None:
        path = self.location.done_marker(shard)
        table = self.read_table(path, f"done marker of shard {shard}: the build did not finish it", kind="done markers", shard=shard)
        if table is None:
            return
        if not {"key", "status", "index"} <= set(table.column_names):
            self.problem(path, "not a done marker (no key, status, index columns)", shard)
            return
        ok = sorted((i, k) for k, s, i in zip(table["key"].to_pylist(), table["status"].to_pylist(), table["index"].to_pylist()) if s == "ok")
        if expected is not None and [k for _, k in ok] != expected:
            self.problem(path, f"lists {len(ok)} written samples, the manifest {len(expected)} (or in another order)", shard)

    # -- tars --

    def check_tar(self, path: str, shard: str, expected: list[str] | None, folder: str | None) -> None:
        loc = self.location
        kind = "base shards" if folder is None else "sidecars"
        if not self.exists(path):
            what = f"base shard {shard}" if folder is None else f"sidecar of shard {shard} for feature {folder}"
            self.problem(path, f"missing ({what})", shard)
            return
        self.report.checked[kind] += 1
        outputs = {"jpg": {}, "json": {}} if folder is None else dict(self.card["features"][folder].get("outputs") or {})
        found: list[str] = []
        error = None
        try:
            size = loc.fs.size(path)
            with loc.fs.open(path, "rb") as stream:
                for key, members in _tar_samples(stream, size):
                    found.append(key)
                    self.check_sample(path, shard, key, members, outputs, folder)
        except _TarError as e:
            error = e
            of = f" of {len(expected)}" if expected is not None else ""
            self.problem(path, f"corrupt or truncated tar: {e.message} ({len(found)}{of} samples read)", shard, e.key)
        except Exception as e:  # cannot open
            error = e
            self.problem(path, f"cannot read: {_short(e)}", shard)
        for key, message in _compare_keys(found, expected, truncated=error is not None) if expected is not None else []:
            self.problem(path, message, shard, key)

    def check_sample(self, path: str, shard: str, key: str, members: dict[str, bytes], outputs: dict[str, Any], folder: str | None) -> None:
        # an output is one member under its own name, or the members its card entry lists
        # (fp8 / bf16 bit patterns: posedata.storage)
        expected = {suffix: list(spec.get("members") or [suffix]) for suffix, spec in outputs.items()}
        known = {m for names in expected.values() for m in names}
        for names in expected.values():
            for name in names:
                if name not in members:
                    self.problem(path, f"no {name!r} member", shard, key)
        for name in members:
            if name not in known:
                self.problem(path, f"unexpected member {key}.{name} (not an output the card lists)", shard, key)
        symbols: dict[str, int] = {}
        for suffix, names in expected.items():
            if any(name not in members for name in names):
                continue
            if folder is None:
                message = self.check_base_member(suffix, members[suffix], key)
                self.report.checked["images" if suffix == "jpg" else "metadata"] += 1
                if message:
                    self.problem(path, f"{suffix}: {message}", shard, key)
                continue
            spec = outputs[suffix]
            try:
                loaded = {name: np.load(io.BytesIO(members[name]), allow_pickle=False) for name in names if name.endswith(".npy")}
                stored = loaded.get(suffix)  # format 1 packed bf16 / fp8, or a plain array
                value = decode_stored_output(suffix, {name: members[name] for name in names})
            except Exception as e:
                self.problem(path, f"{'+'.join(names)}: does not decode: {_short(e)}", shard, key)
                continue
            self.report.checked["arrays"] += 1
            for name, member_spec in (spec.get("members") or {}).items():
                array = loaded.get(name)
                if array is not None and str(array.dtype) != member_spec.get("dtype"):
                    self.problem(path, f"{name}: dtype {array.dtype}, the card says {member_spec.get('dtype')}", shard, key)
                if array is not None and isinstance(member_spec.get("shape"), list):
                    message = self.check_shape(tuple(array.shape), member_spec["shape"], symbols)
                    if message:
                        self.problem(path, f"{name}: {message}", shard, key)
            for message in self.check_value(suffix, value, stored, spec, symbols):
                self.problem(path, f"{suffix}: {message}", shard, key)

    def check_base_member(self, suffix: str, data: bytes, key: str) -> str | None:
        try:
            value = decode_output(suffix, data)
        except Exception as e:
            return f"does not decode: {_short(e)}"
        if suffix == "jpg":
            want = (self.height, self.width, 3)
            if tuple(value.shape) != want:
                return f"image is {value.shape[0]}x{value.shape[1]}, the card's resolution is {self.height}x{self.width}"
        elif isinstance(value, dict) and "key" in value and value["key"] != key:
            return f"meta says key {value['key']!r}"
        return None

    def check_value(self, suffix: str, value: Any, stored: Any, spec: dict[str, Any], symbols: dict[str, int]) -> list[str]:
        """Dtype, shape and finiteness of one decoded output against its card entry."""
        if not isinstance(value, np.ndarray):
            return []
        problems = []
        declared = spec.get("dtype")
        if declared:
            if declared == "float8_e4m3fn":
                if stored is not None and not is_fp8(stored):
                    problems.append(f"stored as {stored.dtype}, the card says packed fp8 (scale + e4m3 bits)")
            elif declared == "bfloat16":
                if stored is not None and not (is_bf16_bits(stored) or stored.dtype == np.float32):
                    problems.append(f"stored as {stored.dtype}, the card says bfloat16 (float32 or bf16 bits)")
            else:
                try:
                    want = np.dtype(declared)
                except TypeError:
                    want = None
                    problems.append(f"the card declares an unknown dtype {declared!r}")
                if want is not None and value.dtype != want:
                    problems.append(f"dtype {value.dtype}, the card says {declared}")
        shape = spec.get("shape")
        if isinstance(shape, list):
            message = self.check_shape(tuple(value.shape), shape, symbols)
            if message:
                problems.append(message)
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            problems.append(f"holds {_nonfinite(value)}")
        return problems

    def check_shape(self, actual: tuple[int, ...], declared: list[Any], symbols: dict[str, int]) -> str | None:
        bad = f"shape {list(actual)}, the card says {declared}"
        if len(actual) != len(declared):
            return bad
        for size, dim in zip(actual, declared):
            want = self.resolve(dim)
            if want is None:  # a free symbol: the same within one sample
                if symbols.setdefault(str(dim), size) != size:
                    return f"{bad} with {dim}={symbols[str(dim)]} from another output of this sample"
            elif size != want:
                return bad + (f" ({dim}={want} at {self.height}x{self.width})" if isinstance(dim, str) else "")
        return None

    def resolve(self, dim: Any) -> int | None:
        if isinstance(dim, int):
            return dim
        text = str(dim).replace(" ", "")
        if text.isdigit():
            return int(text)
        sizes = {"H": self.height, "W": self.width}
        if text in sizes:
            return sizes[text]
        m = re.fullmatch(r"([HW])/(\d+)", text)
        if m:
            return math.ceil(sizes[m.group(1)] / int(m.group(2)))
        return None

    # -- leftovers --

    def check_leftovers(self, shard_split: dict[str, str] | None = None) -> None:
        loc = self.location
        leftovers = sorted(p for p in self.listing if posixpath.basename(p).startswith(".tmp-"))
        for path in leftovers:
            self.problem(path, "leftover temporary file of an interrupted write")
        if shard_split is None or self.only is not None:
            return
        features_dir = loc.path("features") + "/"
        meta_dir = loc.path(META, "features") + "/"
        for path in sorted(self.listing.difference(leftovers)):
            for prefix in (features_dir, meta_dir):
                if not path.startswith(prefix):
                    continue
                rest = path[len(prefix):].split("/")
                if len(rest) != 2:
                    continue
                folder, name = rest
                if folder not in self.card["features"]:
                    if name == FEATURE_CARD:
                        self.problem(path, f"feature folder {folder} is not in dataset.json (an unfinished `posedata extend`?)")
                elif prefix == features_dir and name.endswith(".tar") and name[: -len(".tar")] not in shard_split:
                    self.problem(path, f"sidecar of {name[: -len('.tar')]!r}, which is not a shard of this dataset", name[: -len(".tar")])
                elif prefix == features_dir and self.format >= 2 and not name.endswith(".tar"):
                    self.problem(path, "not a shard: format 2 keeps only shards in a feature folder (tools read every file there as one); its place is meta/")
        for path in sorted(self.listing.difference(leftovers)):
            if path.startswith(loc.path("shards") + "/") and path.endswith(".tar"):
                shard = posixpath.basename(path)[: -len(".tar")]
                if shard not in shard_split:
                    self.problem(path, f"base shard {shard!r} is not in dataset.json", shard)
            elif path.startswith(loc.path("shards") + "/") and self.format >= 2:
                self.problem(path, "not a shard: format 2 keeps only shards in shards/ (tools read every file there as one)")


# ---- tar reading --------------------------------------------------------------------------------


class _TarError(Exception):
    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.message, self.key = message, key


def _split_name(name: str) -> tuple[str | None, str]:
    # webdataset's rule: the key is everything before the first dot of the file name
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2).lower()) if m else (None, "")


def _tar_samples(stream, size: int | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) per run of consecutive members with the same key, as webdataset
    groups them; a read error, or a file of `size` bytes that stops right after a member,
    becomes a _TarError naming the member's key."""
    key: str | None = None
    members: dict[str, bytes] = {}
    last = ""
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 (a stream over the caller's file object, which the caller closes)
    except Exception as e:
        raise _TarError(_short(e)) from e
    while True:
        try:
            info = tar.next()
        except Exception as e:
            raise _TarError(f"{_short(e)} (after member {last or 'none'})", key or "") from e
        if info is None:
            break
        if not info.isreg():
            continue
        name_key, suffix = _split_name(info.name)
        if name_key is None:
            raise _TarError(f"member {info.name!r} has no key.suffix name")
        if key is not None and name_key != key:
            yield key, members  # complete: the next sample has begun
            members = {}
        try:
            f = tar.extractfile(info)
            data = f.read() if f is not None else b""
            if len(data) != info.size:
                raise OSError(f"{len(data)} of {info.size} bytes")
        except Exception as e:
            raise _TarError(f"member {info.name}: {_short(e)}", name_key) from e
        tar.members = []
        last = info.name
        if suffix in members:
            raise _TarError(f"member {info.name} appears twice", name_key)
        key = name_key
        members[suffix] = data
    if key is not None:
        yield key, members
    # tarfile ends quietly when the file stops right after a member; a whole tar has
    # end-of-archive blocks (zeros) after its last member.
    if size is not None and size <= tar.offset:
        raise _TarError(f"the file ends after member {last or 'none'}, with no end-of-archive blocks", key or "")


def _compare_keys(found: list[str], expected: list[str], truncated: bool) -> list[tuple[str, str]]:
    """(key, message) for every key that is duplicated, missing, extra or out of order."""
    out = []
    counts = collections.Counter(found)
    for key, n in counts.items():
        if n > 1:
            out.append((key, f"sample appears {n} times (its members are not together, or it is repeated)"))
    want = set(expected)
    have = set(found)
    if not truncated:
        for index, key in enumerate(expected):
            if key not in have:
                out.append((key, f"missing: the manifest lists it at index {index}"))
    for position, key in enumerate(found):
        if key not in want:
            out.append((key, f"sample {position} is not in the manifest for this shard"))
    common_found = [k for k in dict.fromkeys(found) if k in want]
    common_expected = [k for k in expected if k in have]
    index_of = {k: i for i, k in enumerate(expected)}
    position_of = {k: i for i, k in reversed(list(enumerate(found)))}
    for got, wanted in zip(common_found, common_expected):
        if got != wanted:
            out.append((got, f"out of order: sample {position_of[got]} in the tar, index {index_of[got]} in the manifest"))
    return out


def _nonfinite(value: np.ndarray) -> str:
    nan = int(np.isnan(value).sum())
    inf = int(np.isinf(value).sum())
    return " and ".join(p for p in (f"{nan} NaN" if nan else "", f"{inf} inf" if inf else "") if p) + f" of {value.size} values"


def _short(e: BaseException) -> str:
    text = str(e).strip() or e.__class__.__name__
    return f"{e.__class__.__name__}: {text}" if e.__class__.__name__ not in text else text
