"""Source adapters: every input ends up a record or a reject, with the right key, split,
group, annotations and pairs. Trees are built in tmp_path from real DeepFashion names."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from posedata.records import STAGE_SCAN, safe_key
from posedata.sources import REGISTRY, SourceError, source_class
from posedata.sources.common import load_manifest
from posedata.sources.deepfashion import (
    DeepFashionSource,
    flatten_name,
    item_group,
    unflatten_name,
)
from posedata.sources.folder import FolderSource, group_fraction
from posedata.sources.market1501 import Market1501Source

README_TREE = "WOMEN/Blouses_Shirts/id_00000001/02_1_front.jpg"
README_FLAT = "fashionWOMENBlouses_Shirtsid0000000102_1front.jpg"


# -- helpers ----------------------------------------------------------------------------


def write_jpeg(path: Path, size=(6, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path, format="JPEG")
    return path


def write_lines(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def stem_key(name: str) -> str:
    return safe_key(name.rsplit(".", 1)[0])


def reasons_by_path(scan) -> dict[str, str]:
    return {reject.path: reject.reason for reject in scan.rejects}


def assert_sorted_and_accounted(scan, inputs: int) -> None:
    """Records sorted by (split, group, key); every input a record or a reject; all scan
    rejects; keys webdataset-safe and unique."""
    order = [(r.split, r.group, r.key) for r in scan.records]
    assert order == sorted(order)
    assert len(scan.records) + len(scan.rejects) == inputs
    assert all(reject.stage == STAGE_SCAN and reject.reason for reject in scan.rejects)
    keys = [r.key for r in scan.records]
    assert len(keys) == len(set(keys))
    assert all("." not in key and "/" not in key for key in keys)
    assert scan.info["counts"]["records"] == len(scan.records)
    assert scan.info["counts"]["rejects"] == len(scan.rejects)


@pytest.fixture(scope="module")
def real_train_names(fixtures_dir) -> list[str]:
    return (fixtures_dir / "deepfashion" / "train.lst").read_text().split()


@pytest.fixture(scope="module")
def sample_names(real_train_names) -> list[str]:
    """20 real names: the first 16 of the list plus two pairs of images of one item."""
    first = real_train_names[:16]
    by_item = defaultdict(list)
    for name in real_train_names[16:]:
        by_item[item_group(name)].append(name)
    taken_items = {item_group(name) for name in first}
    same_item = [
        names[:2] for item, names in by_item.items() if len(names) >= 2 and item not in taken_items
    ][:2]
    picked = first + [name for pair in same_item for name in pair]
    assert len(set(picked)) == 20
    return picked


# -- DeepFashion names ------------------------------------------------------------------


def test_flatten_matches_the_patn_rule():
    assert flatten_name(README_TREE) == README_FLAT
    assert flatten_name("img_highres/" + README_TREE) == README_FLAT
    assert flatten_name("fashion/" + README_TREE) == README_FLAT
    assert unflatten_name(README_FLAT) == README_TREE
    assert item_group(README_FLAT) == item_group(README_TREE) == "id_00000001"
    with pytest.raises(ValueError):
        flatten_name("WOMEN/Blouses_Shirts/00000001/02_1_front.jpg")
    with pytest.raises(ValueError):
        unflatten_name("holiday.jpg")


def test_unflatten_inverts_flatten_over_the_whole_real_train_list(real_train_names):
    assert len(real_train_names) == 48674
    for name in real_train_names:
        tree = unflatten_name(name)
        assert tree.startswith(("WOMEN/", "MEN/")) and "/id_" in tree
        assert flatten_name(tree) == name


# -- DeepFashion: original tree with lists ----------------------------------------------


def build_original_tree(root: Path, names: list[str], image_dir="img_highres") -> None:
    for name in names:
        write_jpeg(root / image_dir / unflatten_name(name))


def test_deepfashion_original_tree_with_lists(tmp_path, sample_names):
    root = tmp_path / "df"
    train_names, test_names = sample_names[:14], sample_names[14:]
    build_original_tree(root, sample_names)
    # A text file with an image name is still listed: decoding is the build's job.
    text_as_jpeg = root / "img_highres" / unflatten_name(train_names[0])
    text_as_jpeg.write_text("not a jpeg")
    unlisted = write_jpeg(root / "img_highres/MEN/Denim/id_99999999/01_1_front.jpg")
    not_deepfashion = write_jpeg(root / "img_highres/holiday.jpg")
    notes = root / "img_highres/notes.txt"  # every file is an input: rejected by name here
    notes.write_text("an input too")
    missing = "fashionMENDenimid9999999802_2side.jpg"
    write_lines(root / "train.lst", train_names + [missing])
    write_lines(root / "test.lst", test_names)

    scan = DeepFashionSource(str(root)).scan()

    assert_sorted_and_accounted(scan, inputs=len(sample_names) + 3 + 1)  # + 1 missing entry
    by_key = {r.key: r for r in scan.records}
    assert set(by_key) == {stem_key(n) for n in sample_names}
    for name in sample_names:
        record = by_key[stem_key(name)]
        assert record.split == ("train" if name in train_names else "test")
        assert record.group == item_group(name)
        assert record.group.startswith("id_") and len(record.group) == 11
        assert record.path == str(root / "img_highres" / unflatten_name(name))
        assert record.annotations == {}
    assert by_key[stem_key(train_names[0])].path == str(text_as_jpeg)

    reasons = reasons_by_path(scan)
    assert reasons == {
        str(unlisted): "not listed in train.lst or test.lst",
        str(not_deepfashion): reasons[str(not_deepfashion)],
        str(notes): reasons[str(notes)],
        missing: "listed in train.lst, file not found",
    }
    assert reasons[str(not_deepfashion)].startswith("not a DeepFashion image name")
    assert reasons[str(notes)].startswith("not a DeepFashion image name")
    missing_reject = next(r for r in scan.rejects if r.path == missing)
    assert (missing_reject.key, missing_reject.split) == (stem_key(missing), "train")

    info = scan.info
    assert info["layout"] == "original" and info["image_dirs"] == ["img_highres"]
    assert info["split_from"] == "train.lst/test.lst"
    train_lst = info["files"]["train.lst"]
    assert train_lst["sha256"] == hashlib.sha256((root / "train.lst").read_bytes()).hexdigest()
    assert train_lst["entries"] == 15 and train_lst["canonical"] is False
    assert info["files"]["test.lst"]["canonical"] is None  # no canonical hash recorded
    assert any("train.lst is not the canonical list" in w for w in info["warnings"])
    assert info["counts"]["files_found"] == 23
    assert info["counts"]["refused_while_listing"] == 0
    assert info["counts"]["list_entries_without_file"] == 1
    assert info["counts"]["records_by_split"] == {"test": 6, "train": 14}
    assert scan.pairs == {}


def test_deepfashion_name_in_both_lists_is_rejected(tmp_path, sample_names):
    root = tmp_path / "df"
    build_original_tree(root, sample_names[:3])
    write_lines(root / "train.lst", sample_names[:2])
    write_lines(root / "test.lst", sample_names[1:3])

    scan = DeepFashionSource(str(root)).scan()

    assert [(r.key, r.split) for r in sorted(scan.records, key=lambda r: r.split)] == [
        (stem_key(sample_names[2]), "test"),
        (stem_key(sample_names[0]), "train"),
    ]
    assert reasons_by_path(scan) == {
        str(root / "img_highres" / unflatten_name(sample_names[1])): (
            "listed in both train.lst and test.lst"
        )
    }
    assert_sorted_and_accounted(scan, inputs=3)


def test_deepfashion_canonical_train_list_read_in_place(tmp_path, fixtures_dir, sample_names):
    root = tmp_path / "df"
    build_original_tree(root, sample_names)
    (root / "train.lst").symlink_to(fixtures_dir / "deepfashion" / "train.lst")

    scan = DeepFashionSource(str(root)).scan()

    assert scan.info["files"]["train.lst"]["canonical"] is True
    assert scan.info["files"]["train.lst"]["entries"] == 48674
    assert {r.split for r in scan.records} == {"train"} and len(scan.records) == 20
    assert len(scan.rejects) == 48674 - 20
    assert {r.reason for r in scan.rejects} == {"listed in train.lst, file not found"}
    assert any("only train.lst found" in w for w in scan.info["warnings"])
    assert_sorted_and_accounted(scan, inputs=48674)


def test_deepfashion_without_lists_puts_everything_in_train(tmp_path, sample_names):
    root = tmp_path / "df"
    build_original_tree(root, sample_names[:5], image_dir="img")

    scan = DeepFashionSource(str(root)).scan()

    assert [r.split for r in scan.records] == ["train"] * 5
    assert scan.info["split_from"] == "none"
    assert any("every image was put in split 'train'" in w for w in scan.info["warnings"])
    assert_sorted_and_accounted(scan, inputs=5)


def test_deepfashion_prefers_img_highres_and_image_dir_overrides(tmp_path, sample_names):
    root = tmp_path / "df"
    build_original_tree(root, sample_names[:3], image_dir="img_highres")
    build_original_tree(root, sample_names[3:5], image_dir="img")

    assert DeepFashionSource(str(root)).scan().info["image_dirs"] == ["img_highres"]
    assert len(DeepFashionSource(str(root)).scan().records) == 3
    low_res = DeepFashionSource(str(root), image_dir="img").scan()
    assert {r.key for r in low_res.records} == {stem_key(n) for n in sample_names[3:5]}
    with pytest.raises(SourceError, match="image_dir nowhere/ not found"):
        DeepFashionSource(str(root), image_dir="nowhere").scan()


def test_deepfashion_duplicate_keys_first_in_path_order_wins(tmp_path, sample_names):
    root = tmp_path / "df"
    name = sample_names[0]
    tree_copy = write_jpeg(root / "img_highres" / unflatten_name(name))
    flat_copy = write_jpeg(root / "img_highres" / name)  # 'W'/'M' sort before 'f'

    scan = DeepFashionSource(str(root)).scan()

    assert [r.path for r in scan.records] == [str(tree_copy)]
    assert reasons_by_path(scan) == {
        str(flat_copy): f"duplicate key {stem_key(name)} (same as {tree_copy})"
    }
    assert_sorted_and_accounted(scan, inputs=2)


# -- DeepFashion: flattened split folders -----------------------------------------------


@pytest.mark.parametrize("folders", [("train_highres", "test_highres"), ("train", "test")])
def test_deepfashion_split_folders(tmp_path, sample_names, folders):
    root = tmp_path / "df"
    train_folder, test_folder = folders
    for name in sample_names[:12]:
        write_jpeg(root / train_folder / name)
    for name in sample_names[12:]:
        write_jpeg(root / test_folder / name)
    # The same flattened name in both folders: test_* sorts first, so it wins.
    both = sample_names[0]
    test_copy = write_jpeg(root / test_folder / both)

    scan = DeepFashionSource(str(root)).scan()

    assert scan.info["layout"] == "split-folders"
    assert scan.info["image_dirs"] == [train_folder, test_folder]
    assert scan.info["split_from"] == "folders"
    by_key = {r.key: r for r in scan.records}
    assert set(by_key) == {stem_key(n) for n in sample_names}
    assert by_key[stem_key(both)].path == str(test_copy)
    assert by_key[stem_key(both)].split == "test"
    for name in sample_names[1:12]:
        assert by_key[stem_key(name)].split == "train"
    for name in sample_names[12:]:
        assert by_key[stem_key(name)].split == "test"
        assert by_key[stem_key(name)].group == item_group(name)
    assert reasons_by_path(scan) == {
        str(root / train_folder / both): f"duplicate key {stem_key(both)} (same as {test_copy})"
    }
    assert_sorted_and_accounted(scan, inputs=21)


# -- DeepFashion: pair and keypoint CSVs ------------------------------------------------


def keypoint_csv_row(name: str, ys: list[int], xs: list[int]) -> str:
    return f"{name}:{json.dumps(ys)}:{json.dumps(xs)}\n"


@pytest.mark.parametrize("spelling", ["fasion", "fashion"])
def test_deepfashion_pair_and_keypoint_csvs(tmp_path, sample_names, spelling):
    root = tmp_path / "df"
    train_names, test_names = sample_names[:12], sample_names[12:]
    for name in train_names:
        write_jpeg(root / "train_highres" / name)
    for name in test_names:
        write_jpeg(root / "test_highres" / name)
    (root / f"{spelling}-resize-pairs-train.csv").write_text(
        "from,to\n"
        f"{train_names[0]},{train_names[1]}\n"
        f"{train_names[1]},{train_names[0]}\n"
        f"{train_names[2]},fashionMENDenimid9999999901_1front.jpg\n"
    )
    (root / f"{spelling}-resize-pairs-test.csv").write_text(
        f"from,to\n{test_names[0]},{test_names[1]}\n"
    )
    ys = list(range(10, 28))
    xs = [-1] + list(range(100, 117))
    (root / f"{spelling}-resize-annotation-train.csv").write_text(
        "name:keypoints_y:keypoints_x\n"
        + keypoint_csv_row(train_names[0], ys, xs)
        + keypoint_csv_row("fashionMENDenimid9999999901_1front.jpg", ys, xs)
        + f"{train_names[1]}:[1, 2]:[3, 4]\n"  # malformed: not 18 joints
    )
    (root / f"{spelling}-resize-annotation-test.csv").write_text(
        "name:keypoints_y:keypoints_x\n" + keypoint_csv_row(test_names[0], ys, xs)
    )

    scan = DeepFashionSource(str(root)).scan()

    assert scan.pairs == {
        "test": [(stem_key(test_names[0]), stem_key(test_names[1]))],
        "train": [
            (stem_key(train_names[0]), stem_key(train_names[1])),
            (stem_key(train_names[1]), stem_key(train_names[0])),
            (stem_key(train_names[2]), "fashionMENDenimid9999999901_1front"),
        ],
    }
    assert scan.info["pairs"]["train"] == {"count": 3, "with_unknown_keys": 1}
    by_key = {r.key: r for r in scan.records}
    annotated = by_key[stem_key(train_names[0])].annotations
    assert annotated["keypoints_frame"] == [256, 176]
    assert annotated["keypoints"][0] == [0.0, 0.0, 0.0]  # x = -1: missing
    assert annotated["keypoints"][1] == [100.0, 11.0, 1.0]  # [x, y, score]
    assert len(annotated["keypoints"]) == 18
    assert "keypoints" in by_key[stem_key(test_names[0])].annotations
    assert by_key[stem_key(train_names[1])].annotations == {}
    assert scan.has_keypoint_annotations
    assert scan.info["counts"]["records_with_keypoints"] == 2
    train_csv = scan.info["files"][f"{spelling}-resize-annotation-train.csv"]
    assert train_csv["malformed_rows"] == 1 and train_csv["rows_without_image"] == 1
    assert len(scan.info["files"][f"{spelling}-resize-pairs-train.csv"]["sha256"]) == 64
    assert any("1 malformed rows skipped" in w for w in scan.info["warnings"])
    assert_sorted_and_accounted(scan, inputs=20)


def test_pair_csv_without_from_to_header_is_a_source_error(tmp_path, sample_names):
    root = tmp_path / "df"
    write_jpeg(root / "train" / sample_names[0])
    (root / "fasion-resize-pairs-train.csv").write_text("a,b\nx,y\n")
    with pytest.raises(SourceError, match="expected a pair CSV with header 'from,to'"):
        DeepFashionSource(str(root)).scan()


def test_lists_and_csvs_with_a_byte_order_mark_are_read_as_written(tmp_path, sample_names):
    """Windows editors save UTF-8 with a BOM: it must not stick to the first name."""
    root = tmp_path / "df"
    names = sample_names[:4]
    build_original_tree(root, names)
    (root / "train.lst").write_bytes("\ufeff".encode() + "".join(f"{n}\n" for n in names[:3]).encode())
    (root / "test.lst").write_text(f"{names[3]}\n", encoding="utf-8-sig")
    (root / "fasion-resize-pairs-train.csv").write_text(f"from,to\n{names[0]},{names[1]}\n", encoding="utf-8-sig")
    ys, xs = list(range(10, 28)), list(range(20, 38))
    (root / "fasion-resize-annotation-train.csv").write_text("name:keypoints_y:keypoints_x\n" + keypoint_csv_row(names[0], ys, xs), encoding="utf-8-sig")

    scan = DeepFashionSource(str(root)).scan()

    assert scan.rejects == []
    assert {r.key: r.split for r in scan.records} == {stem_key(n): "train" for n in names[:3]} | {stem_key(names[3]): "test"}
    assert scan.pairs == {"train": [(stem_key(names[0]), stem_key(names[1]))]}
    assert {r.key: r.annotations for r in scan.records}[stem_key(names[0])]["keypoints"][0] == [20.0, 10.0, 1.0]


def test_a_list_in_another_encoding_is_one_error_naming_file_and_line(tmp_path, sample_names):
    root = tmp_path / "df"
    build_original_tree(root, sample_names[:2])
    (root / "train.lst").write_text(f"{sample_names[0]}\n{sample_names[1]}\n", encoding="utf-16")
    with pytest.raises(SourceError) as caught:
        DeepFashionSource(str(root)).scan()
    assert str(caught.value) == f"{root / 'train.lst'}, line 1: not UTF-8 text (byte 0xff) (it looks like UTF-16); save it as UTF-8"

    (root / "train.lst").write_bytes(f"{sample_names[0]}\nCaf\xe9.jpg\n".encode("latin-1"))
    with pytest.raises(SourceError, match=r"train\.lst, line 2: not UTF-8 text \(byte 0xe9\)"):
        DeepFashionSource(str(root)).scan()


@pytest.mark.parametrize(
    "file, text, words",
    [
        ("fasion-resize-pairs-train.csv", "from,to\n{a},{b}\n{a}\n", "fasion-resize-pairs-train.csv, line 3: expected two names 'from,to', found"),
        ("fasion-resize-pairs-train.csv", "from,to\n{a},{b},{a}\n", "fasion-resize-pairs-train.csv, line 2: expected two names 'from,to'"),
        ("train_pairs.txt", "img/{ta},img/{tb}\nimg/{ta}\n", "train_pairs.txt, line 2: expected 'target,source1[,source2...]'"),
    ],
)
def test_a_malformed_pair_line_is_one_error_naming_file_and_line(tmp_path, sample_names, file, text, words):
    root = tmp_path / "df"
    build_original_tree(root, sample_names[:2], image_dir="img")
    a, b = sample_names[:2]
    (root / file).write_text(text.format(a=a, b=b, ta=unflatten_name(a), tb=unflatten_name(b)))
    with pytest.raises(SourceError) as caught:
        DeepFashionSource(str(root)).scan()
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_keypoints_outside_the_frame_are_stored_missing_and_reported(tmp_path, sample_names):
    root = tmp_path / "df"
    names = sample_names[:2]
    build_original_tree(root, names)
    ys, xs = list(range(10, 28)), list(range(20, 38))
    typo_xs = [1000000000] + xs[1:]
    typo_ys = ys[:2] + [300] + ys[3:]  # below the 256-high frame
    (root / "fasion-resize-annotation-train.csv").write_text(
        "name:keypoints_y:keypoints_x\n" + keypoint_csv_row(names[0], ys, xs) + keypoint_csv_row(names[1], typo_ys, typo_xs)
    )

    scan = DeepFashionSource(str(root)).scan()

    points = {r.key: r.annotations["keypoints"] for r in scan.records}
    assert points[stem_key(names[0])][0] == [20.0, 10.0, 1.0]
    typo = points[stem_key(names[1])]
    assert typo[0] == [0.0, 0.0, 0.0] and typo[2] == [0.0, 0.0, 0.0] and typo[1] == [21.0, 11.0, 1.0]
    assert scan.info["files"]["fasion-resize-annotation-train.csv"]["joints_outside_frame"] == 2
    assert any(f"2 joints not finite or outside the 256x176 frame stored as missing (first at line 3, {names[1]})" in w for w in scan.info["warnings"])


# -- DeepFashion: PIDM layout -----------------------------------------------------------


def write_pose(path: Path, points: list[tuple[float, float]]) -> None:
    write_lines(path, [f"{x} {y}" for x, y in points])


def test_deepfashion_pidm_layout(tmp_path, sample_names):
    root = tmp_path / "pidm"
    train_names, test_names = sample_names[:12], sample_names[12:18]
    outside = sample_names[18]  # an image no pair file names
    build_original_tree(root, train_names + test_names + [outside], image_dir="img")
    tree = {name: "img/" + unflatten_name(name) for name in sample_names}
    missing = "img/MEN/Denim/id_99999999/01_1_front.jpg"
    write_lines(
        root / "train_pairs.txt",
        [",".join([tree[train_names[0]], tree[train_names[1]], tree[train_names[2]]])]
        + [",".join([tree[a], tree[b]]) for a, b in zip(train_names[3:], train_names[4:])],
    )
    write_lines(
        root / "test_pairs.txt",
        [",".join([tree[test_names[0]], tree[test_names[1]]]), f"{tree[test_names[2]]},{missing}"]
        + [",".join([tree[test_names[3]], tree[test_names[4]], tree[test_names[5]]])],
    )
    pose = [(100.0, 50.0), (-1.0, -1.0)] + [(60.0 + i, 70.0 + i) for i in range(16)]
    write_pose(root / "pose" / unflatten_name(train_names[0]).replace(".jpg", ".txt"), pose)
    write_pose(root / "pose" / test_names[0].replace(".jpg", ".txt"), pose)  # by flat name
    write_lines(root / "pose" / unflatten_name(train_names[1]).replace(".jpg", ".txt"), ["1 2"])

    scan = DeepFashionSource(str(root)).scan()

    assert scan.info["layout"] == "pidm"
    assert scan.info["split_from"] == "train_pairs.txt/test_pairs.txt"
    by_key = {r.key: r for r in scan.records}
    assert {k: r.split for k, r in by_key.items()} == {
        **{stem_key(n): "train" for n in train_names},
        **{stem_key(n): "test" for n in test_names},
    }
    assert reasons_by_path(scan) == {
        str(root / tree[outside]): "not named in train_pairs.txt or test_pairs.txt",
        missing: "named in test_pairs.txt, file not found",
    }
    # Each line `target,src1,src2` gives (src_i, target).
    k = {name: stem_key(name) for name in sample_names}
    assert scan.pairs["train"][:2] == [
        (k[train_names[1]], k[train_names[0]]),
        (k[train_names[2]], k[train_names[0]]),
    ]
    assert len(scan.pairs["train"]) == 2 + 8
    assert scan.pairs["test"] == [
        (k[test_names[1]], k[test_names[0]]),
        ("fashionMENDenimid9999999901_1front", k[test_names[2]]),
        (k[test_names[4]], k[test_names[3]]),
        (k[test_names[5]], k[test_names[3]]),
    ]
    # Pose files: x shifted from the 256x256 frame into the 176-wide crop, -1 missing.
    for name in (train_names[0], test_names[0]):
        annotations = by_key[k[name]].annotations
        assert annotations["keypoints_frame"] == [256, 176]
        assert annotations["keypoints"][0] == [60.0, 50.0, 1.0]
        assert annotations["keypoints"][1] == [0.0, 0.0, 0.0]
        assert annotations["keypoints"][2] == [20.0, 70.0, 1.0]
    assert by_key[k[train_names[1]]].annotations == {}  # malformed pose file
    assert scan.info["files"]["pose/"] == {"pose_files_used": 2, "malformed": 1}
    assert scan.info["files"]["train_pairs.txt"]["pairs"] == 10
    assert_sorted_and_accounted(scan, inputs=19 + 1)


def test_deepfashion_pidm_lists_win_and_csv_keypoints_win(tmp_path, sample_names):
    root = tmp_path / "pidm"
    names = sample_names[:4]
    build_original_tree(root, names, image_dir="img")
    tree = {name: "img/" + unflatten_name(name) for name in names}
    write_lines(root / "train_pairs.txt", [f"{tree[names[0]]},{tree[names[1]]}"])
    write_lines(root / "train.lst", names[:2])
    write_lines(root / "test.lst", names[2:])
    write_pose(root / "pose" / unflatten_name(names[0]).replace(".jpg", ".txt"), [(50, 5)] * 18)
    write_pose(root / "pose" / unflatten_name(names[1]).replace(".jpg", ".txt"), [(50, 5)] * 18)
    (root / "fasion-resize-annotation-train.csv").write_text(
        "name:keypoints_y:keypoints_x\n" + keypoint_csv_row(names[0], [7] * 18, [9] * 18)
    )

    scan = DeepFashionSource(str(root)).scan()

    assert scan.info["split_from"] == "train.lst/test.lst"
    by_key = {r.key: r for r in scan.records}
    assert [by_key[stem_key(n)].split for n in names] == ["train", "train", "test", "test"]
    assert by_key[stem_key(names[0])].annotations["keypoints"][0] == [9.0, 7.0, 1.0]  # CSV
    assert by_key[stem_key(names[1])].annotations["keypoints"][0] == [10.0, 5.0, 1.0]  # pose
    assert scan.info["keypoints"]["from"] == ["fasion-resize-annotation-train.csv", "pose/"]
    assert scan.pairs == {"train": [(stem_key(names[1]), stem_key(names[0]))]}
    assert_sorted_and_accounted(scan, inputs=4)


# -- Market-1501 ------------------------------------------------------------------------


def test_market1501(tmp_path):
    root = tmp_path / "market"
    train = ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0007_c1s6_028546_01.jpg"]
    test = ["0001_c1s1_001051_00.jpg", "0001_c5s1_001101_02.jpg"]
    for name in train:
        write_jpeg(root / "bounding_box_train" / name, size=(64, 128))
    for name in test:
        write_jpeg(root / "bounding_box_test" / name, size=(64, 128))
    junk = write_jpeg(root / "bounding_box_test/-1_c1s1_000401_03.jpg")
    distractor = write_jpeg(root / "bounding_box_test/0000_c1s1_000151_01.jpg")
    odd = write_jpeg(root / "bounding_box_train/thumbs.jpg")
    thumbs_db = root / "bounding_box_train/Thumbs.db"  # an input too: rejected by its name
    thumbs_db.write_text("")
    write_jpeg(root / "query/0001_c1s1_001051_00.jpg")  # not an input
    (root / "market-pairs-train.csv").write_text(f"from,to\n{train[0]},{train[1]}\n")
    ys, xs = list(range(18)), [-1] * 2 + list(range(30, 46))
    (root / "market-annotation-train.csv").write_text(
        "name:keypoints_y:keypoints_x\n" + keypoint_csv_row(train[1], ys, xs)
    )

    scan = Market1501Source(str(root)).scan()

    assert Market1501Source.default_resolution == (128, 64)
    assert [(r.split, r.group, r.key) for r in scan.records] == [
        ("test", "0001", "0001_c1s1_001051_00"),
        ("test", "0001", "0001_c5s1_001101_02"),
        ("train", "0002", "0002_c1s1_000451_03"),
        ("train", "0002", "0002_c2s1_000301_01"),
        ("train", "0007", "0007_c1s6_028546_01"),
    ]
    reasons = reasons_by_path(scan)
    assert reasons[str(junk)] == "Market-1501 junk id -1"
    assert reasons[str(distractor)] == "Market-1501 distractor id 0000"
    assert reasons[str(odd)].startswith("not a Market-1501 name")
    assert scan.pairs == {"train": [("0002_c1s1_000451_03", "0002_c2s1_000301_01")]}
    annotations = {r.key: r.annotations for r in scan.records}["0002_c2s1_000301_01"]
    assert annotations["keypoints_frame"] == [128, 64]
    assert annotations["keypoints"][:3] == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [30.0, 2.0, 1.0]]
    assert scan.info["ignored_folders"] == ["query"]
    assert scan.info["layout"] == "bounding-box"
    assert reasons[str(thumbs_db)].startswith("not a Market-1501 name")
    assert scan.info["counts"]["files_found"] == 9
    assert "market-pairs-train.csv" in scan.info["files"]
    assert_sorted_and_accounted(scan, inputs=9)


def test_market1501_patn_train_test_folders(tmp_path):
    root = tmp_path / "market_data"
    write_jpeg(root / "train/0002_c1s1_000451_03.jpg")
    write_jpeg(root / "test/0001_c1s1_001051_00.jpg")
    scan = Market1501Source(str(root)).scan()
    assert scan.info["layout"] == "patn"
    assert [(r.split, r.group) for r in scan.records] == [("test", "0001"), ("train", "0002")]


# -- folder -----------------------------------------------------------------------------


def test_folder_every_file_is_an_input_keys_duplicates_and_hidden(tmp_path):
    root = tmp_path / "photos"
    write_jpeg(root / "alice/look_1/front.jpg")
    write_jpeg(root / "alice/look_1/back.JPEG")
    write_jpeg(root / "bob/side.png")
    png_twin = write_jpeg(root / "bob/side.webp")  # same key as side.png
    notes_twin = root / "bob/front.json"  # same key as front.tif: the photo keeps the key
    notes_twin.write_text("{}")
    write_jpeg(root / "bob/front.tif")
    write_jpeg(root / "solo.bmp")
    write_jpeg(root / "scan.TIFF")
    (root / "fake.jpg").write_text("text, not an image")  # an input; decode rejects it later
    (root / "bob/notes.txt").write_text("")  # an input too: its bytes decide
    hidden_folder = write_jpeg(root / ".cache/thumb.jpg").parent
    hidden_file = write_jpeg(root / "bob/.hidden.jpg")

    scan = FolderSource(str(root)).scan()

    assert {(r.key, r.group, r.split) for r in scan.records} == {
        ("alice__look_1__front", "alice/look_1", "train"),
        ("alice__look_1__back", "alice/look_1", "train"),
        ("bob__side", "bob", "train"),
        ("bob__front", "bob", "train"),
        ("bob__notes", "bob", "train"),
        ("solo", "photos", "train"),
        ("scan", "photos", "train"),
        ("fake", "photos", "train"),
    }
    assert {r.key: r.path for r in scan.records}["bob__front"] == str(root / "bob/front.tif")
    assert reasons_by_path(scan) == {
        str(png_twin): f"duplicate key bob__side (same as {root / 'bob/side.png'})",
        str(notes_twin): f"duplicate key bob__front (same as {root / 'bob/front.tif'})",
        str(hidden_folder): "hidden folder (name starts with '.'): not read",
        str(hidden_file): "hidden file (name starts with '.'): not read",
    }
    assert scan.info["counts"] == {**scan.info["counts"], "files_found": 10, "refused_while_listing": 2}
    assert_sorted_and_accounted(scan, inputs=12)


def test_folder_keys_are_injective(tmp_path):
    """Names that only differ in characters a key cannot hold get different keys (a short
    hash of the path); clean names keep their plain key."""
    root = tmp_path / "photos"
    names = ["张三.jpg", "李四.jpg", "王五.jpg", "Caf\u00e9.jpg", "Cafe\u0301.jpg", "\U0001f600.jpg", "\U0001f601.jpg", "a b.jpg", "a_b.jpg", "a.b.jpg", "x::y.jpg", "x__y.jpg", "x/y.jpg", "p-0123456789ab.jpg"]
    for name in names:
        write_jpeg(root / "people" / name)

    scan = FolderSource(str(root)).scan()

    assert scan.rejects == []
    keys = {Path(r.path).name if "/x/" not in r.path else "x/y.jpg": r.key for r in scan.records}
    assert len(set(keys.values())) == len(names)
    assert keys["a_b.jpg"] == "people__a_b" and keys["x/y.jpg"] == "people__x__y"  # clean: as before
    assert keys["a b.jpg"].startswith("people__a_b-") and keys["x__y.jpg"].startswith("people__x__y-")
    assert all(len(keys[n].rsplit("-", 1)[1]) == 12 for n in ("张三.jpg", "Café.jpg", "a.b.jpg", "x::y.jpg", "p-0123456789ab.jpg"))
    assert_sorted_and_accounted(scan, inputs=len(names))


def test_folder_refuses_a_file_name_that_is_not_utf8(tmp_path):
    import os

    root = tmp_path / "photos"
    write_jpeg(root / "a/ok.jpg")
    latin1 = os.fsencode(root / "a") + b"/caf\xe9.jpg"  # from an old zip: Latin-1 bytes
    with open(latin1, "wb") as handle:
        handle.write((root / "a/ok.jpg").read_bytes())

    scan = FolderSource(str(root)).scan()

    assert [r.key for r in scan.records] == ["a__ok"]
    (reject,) = scan.rejects
    assert reject.path == str(root / "a") + "/caf\\xe9.jpg"  # text a table can hold
    assert reject.reason.startswith("file name is not valid UTF-8")
    reject.path.encode("utf-8")


def test_folder_refuses_pipes_broken_links_and_unlistable_folders(tmp_path, monkeypatch):
    import os

    root = tmp_path / "photos"
    write_jpeg(root / "ok/a.jpg")
    pipe = root / "ok/pipe.jpg"
    os.mkfifo(pipe)
    broken = root / "ok/gone.jpg"
    broken.symlink_to(root / "nowhere.jpg")
    locked = write_jpeg(root / "locked/b.jpg").parent
    loop = root / "ok" / "loop"
    loop.symlink_to(root / "ok", target_is_directory=True)  # read once, refused the second time
    # As the kernel answers an ordinary user for a mode-000 folder (tests often run as root,
    # which lists anything; tests/test_hostile_inputs.py does it for real under setpriv).
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)

    scan = FolderSource(str(root)).scan()

    reasons = reasons_by_path(scan)
    assert reasons == {
        str(pipe): "not a regular file (a named pipe)",
        str(broken): "broken symlink (its target does not exist)",
        str(loop): "folder reached again through a symlink (already read as ok/): not read again",
        str(locked): "cannot list folder: PermissionError: Permission denied",
    }
    assert [r.key for r in scan.records] == ["ok__a"]
    assert_sorted_and_accounted(scan, inputs=5)


def test_folder_group_regex(tmp_path):
    root = tmp_path / "shoot"
    write_jpeg(root / "2024/model-017_pose1.jpg")
    write_jpeg(root / "2024/model-017_pose2.jpg")
    write_jpeg(root / "2025/model-102_a.png")
    stray = write_jpeg(root / "2025/behind_the_scenes.jpg")

    named = FolderSource(str(root), group_regex=r"model-(?P<group>\d+)_").scan()
    assert {(r.key, r.group) for r in named.records} == {
        ("2024__model-017_pose1", "017"),
        ("2024__model-017_pose2", "017"),
        ("2025__model-102_a", "102"),
    }
    assert reasons_by_path(named) == {
        str(stray): r"path does not match group_regex 'model-(?P<group>\d+)_'"
    }
    assert_sorted_and_accounted(named, inputs=4)

    numbered = FolderSource(str(root), group_regex=r"^(\d{4})/").scan()
    assert {r.group for r in numbered.records} == {"2024", "2025"}
    assert numbered.rejects == []

    with pytest.raises(SourceError, match="not a valid regex"):
        FolderSource(str(root), group_regex="(unclosed")


def test_folder_test_fraction_is_deterministic_and_keeps_groups_whole(tmp_path):
    root = tmp_path / "people"
    groups = [f"person{i:03d}" for i in range(120)]
    for group in groups:
        for view in ("front", "back"):
            write_jpeg(root / group / f"{view}.jpg", size=(2, 2))

    first = FolderSource(str(root), test_fraction=0.25).scan()
    again = FolderSource(str(root), test_fraction=0.25).scan()
    other_seed = FolderSource(str(root), test_fraction=0.25, seed=7).scan()

    def split_of(scan):
        splits = defaultdict(set)
        for record in scan.records:
            splits[record.group].add(record.split)
        assert all(len(s) == 1 for s in splits.values())  # a group never straddles splits
        return {group: s.pop() for group, s in splits.items()}

    assignment = split_of(first)
    assert assignment == split_of(again)
    assert assignment != split_of(other_seed)
    held_out = {g for g, s in assignment.items() if s == "test"}
    assert 15 <= len(held_out) <= 45
    assert held_out == {g for g in groups if group_fraction(g, 0) < 0.25}

    # Adding groups leaves every existing assignment as it was.
    for i in range(120, 150):
        write_jpeg(root / f"person{i:03d}" / "front.jpg", size=(2, 2))
    grown = split_of(FolderSource(str(root), test_fraction=0.25).scan())
    assert {g: grown[g] for g in assignment} == assignment

    assert {r.split for r in FolderSource(str(root)).scan().records} == {"train"}
    with pytest.raises(SourceError, match="test_fraction must be between 0 and 1"):
        FolderSource(str(root), test_fraction=1.5)


def test_folder_scans_the_real_fixture_photos(fixtures_dir):
    root = fixtures_dir / "deepfashion"
    scan = FolderSource(str(root)).scan()
    assert [r.key for r in scan.records] == [
        "patn_women1_176x256",
        "patn_women2_176x256",
        "pcdms_img6_750x1101",
        "pcdms_img7_750x1101",
        "pcdms_img8_750x1101",
        "train",
    ]
    assert {(r.split, r.group) for r in scan.records} == {("train", "deepfashion")}
    assert all(Path(r.path).is_file() and r.path.startswith(str(root)) for r in scan.records)
    assert scan.rejects == []  # train.lst is an input too: the decode stage rejects it
    assert_sorted_and_accounted(scan, inputs=6)


# -- errors, registry, manifests --------------------------------------------------------

SOURCES = [DeepFashionSource, Market1501Source, FolderSource]


@pytest.mark.parametrize("source", SOURCES)
def test_missing_root_is_a_one_line_source_error(tmp_path, source):
    with pytest.raises(SourceError) as caught:
        source(str(tmp_path / "nowhere")).scan()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'nowhere'}: no such directory; expected ")


@pytest.mark.parametrize("source", SOURCES)
def test_empty_root_is_a_one_line_source_error(tmp_path, source):
    (tmp_path / "random").mkdir()
    with pytest.raises(SourceError) as caught:
        source(str(tmp_path)).scan()
    assert "\n" not in str(caught.value) and "expected" in str(caught.value)


def test_wrong_layout_messages_say_what_was_expected(tmp_path):
    write_jpeg(tmp_path / "photos/a.jpg")
    with pytest.raises(SourceError) as caught:
        DeepFashionSource(str(tmp_path)).scan()
    assert str(caught.value) == (
        f"{tmp_path}: no DeepFashion layout found: expected img/ or img_highres/ "
        "(WOMEN|MEN/<category>/id_XXXXXXXX/*.jpg) with train.lst/test.lst, or train_highres/ "
        "and test_highres/ (or train/ and test/) of flattened names, or the PIDM layout "
        "(img/, pose/, train_pairs.txt, test_pairs.txt)"
    )
    expected_market = "no Market-1501 layout found: expected bounding_box_train/"
    with pytest.raises(SourceError, match=expected_market):
        Market1501Source(str(tmp_path)).scan()
    (tmp_path / "img").mkdir()
    with pytest.raises(SourceError, match=r"img/ hold no files"):
        DeepFashionSource(str(tmp_path)).scan()


def test_registry_and_default_resolutions():
    assert {name: source_class(name).default_resolution for name in REGISTRY} == {
        "deepfashion": (256, 176),
        "market1501": (128, 64),
        "folder": (512, 352),
    }
    assert all(source_class(name).name == name for name in REGISTRY)


def test_manifests_record_the_real_train_list(fixtures_dir):
    train_lst = fixtures_dir / "deepfashion" / "train.lst"
    recorded = load_manifest("deepfashion")["lists"]["train.lst"]
    assert recorded["sha256"] == hashlib.sha256(train_lst.read_bytes()).hexdigest()
    assert recorded["count"] == len(train_lst.read_text().split())
    assert recorded["verified"] is True
    market = load_manifest("market1501")["images"]
    assert market["bounding_box_train"]["count"] == 12936
    assert market["bounding_box_test"]["count"] == 19732
