"""KG loading (hitter_core/data.py) and the data fetch script (data/download.py)."""

import importlib.util
import logging
import sys
from pathlib import Path

import pytest
import torch

from hitter_core.cli import run_cli
from hitter_core.data import DataFormatError, load_kg

REPO = Path(__file__).resolve().parents[1]


def write_kg(root: Path, train: str, valid: str = "a\tr\tb\n", test: str = "b\tr\ta\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        (root / f"{split}.txt").write_text(text)
    return root


def test_tiny_graph_ids_follow_first_appearance(tmp_path):
    kg = load_kg(write_kg(tmp_path / "g", "a\tr\tb\nb\ts\tc\n", "c\tr\ta\n", "a\ts\tc\n"))
    assert kg.entities == ["a", "b", "c"]
    assert kg.relations == ["r", "s"]
    assert kg.train.tolist() == [[0, 0, 1], [1, 1, 2]]
    assert kg.valid.tolist() == [[2, 0, 0]]
    assert kg.entity_names == ["a", "b", "c"]  # no names file: identifiers


def test_wrong_column_count_names_file_and_line(tmp_path):
    root = write_kg(tmp_path / "g", "a\tr\tb\n\na\tr\n")
    with pytest.raises(DataFormatError, match=r"train\.txt:3: expected 3"):
        load_kg(root)


def test_empty_field_names_file_and_line(tmp_path):
    root = write_kg(tmp_path / "g", "a\tr\tb\n", valid="a\t \tb\n")
    with pytest.raises(DataFormatError, match=r"valid\.txt:1: empty field"):
        load_kg(root)


def test_empty_split_and_missing_file(tmp_path):
    with pytest.raises(DataFormatError, match=r"test\.txt: the split is empty"):
        load_kg(write_kg(tmp_path / "g", "a\tr\tb\n", test="\n"))
    root = write_kg(tmp_path / "h", "a\tr\tb\n")
    (root / "valid.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"valid\.txt: no such file"):
        load_kg(root)
    with pytest.raises(FileNotFoundError, match="no such dataset directory"):
        load_kg(tmp_path / "nowhere")


def test_unseen_entities_kept_and_counted_or_dropped(tmp_path, caplog):
    root = write_kg(tmp_path / "g", "a\tr\tb\n", valid="a\tr\tz\na\tr\tb\n", test="b\tr\ta\n")
    with caplog.at_level(logging.WARNING):
        kg = load_kg(root)
    assert kg.num_unseen == {"valid": 1, "test": 0}
    assert len(kg.valid) == 2 and "1 triples involve an entity not in train" in caplog.text
    dropped = load_kg(root, drop_unseen=True)
    assert dropped.valid.tolist() == [[0, 0, 1]]
    assert dropped.num_entities == 3  # the vocabulary still covers every split


def test_unseen_relation_counted_named_and_dropped(tmp_path, caplog):
    root = write_kg(tmp_path / "g", "a\tr\tb\n", valid="a\tq\tb\na\tr\tb\n")
    with caplog.at_level(logging.WARNING):
        kg = load_kg(root)
    assert kg.num_unseen == {"valid": 1, "test": 0}
    assert "valid.txt: 1 triples have a relation not in train (q)" in caplog.text
    assert load_kg(root, drop_unseen=True).valid.tolist() == [[0, 0, 1]]


def test_invalid_utf8_names_file_and_line(tmp_path):
    root = write_kg(tmp_path / "g", "a\tr\tb\n")
    (root / "test.txt").write_bytes(b"a\tr\tb\nb\tr\t\xff\xfe\n")
    with pytest.raises(DataFormatError, match=r"test\.txt:2: not valid UTF-8"):
        load_kg(root)
    (root / "test.txt").write_text("b\tr\ta\n")
    (root / "entity_names.tsv").write_bytes(b"a\tAlpha\n\xc3\n")
    with pytest.raises(DataFormatError, match=r"entity_names\.tsv:2: not valid UTF-8"):
        load_kg(root)


def test_entity_names_file(tmp_path):
    root = write_kg(tmp_path / "g", "a\tr\tb\n")
    (root / "entity_names.tsv").write_text("a\tAlpha\n")
    assert load_kg(root).entity_names == ["Alpha", "b"]


@pytest.mark.realdata
def test_fb15k237_counts(fb15k237, data_root):
    kg = fb15k237
    assert [len(kg.train), len(kg.valid), len(kg.test)] == [272_115, 17_535, 20_466]
    assert (kg.num_entities, kg.num_relations) == (14_541, 237)
    assert kg.num_unseen == {"valid": 9, "test": 28}  # REFERENCE.md
    assert kg.train.dtype == torch.long and kg.train.shape == (272_115, 3)
    # Same numbering as HittER/LibKGE (the released QA files rely on it).
    libkge = (data_root / "fb15k-237" / "libkge_entity_ids.tsv").read_text().splitlines()
    assert kg.entities == [line.split("\t")[1] for line in libkge]
    assert kg.entity_names[0] == "Dominican Republic"


@pytest.mark.realdata
def test_wn18rr_counts(wn18rr):
    kg = wn18rr
    assert [len(kg.train), len(kg.valid), len(kg.test)] == [86_835, 3_034, 3_134]
    assert (kg.num_entities, kg.num_relations) == (40_943, 11)
    assert kg.num_unseen == {"valid": 210, "test": 210}


def _download_module():
    spec = importlib.util.spec_from_file_location("download", REPO / "data" / "download.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["download"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.mark.realdata
def test_download_from_local_verifies_checksums(data_root, tmp_path):
    download = _download_module()
    out = tmp_path / "prepared"
    assert download.main(["--out", str(out), "--from-local", str(data_root),
                          "--datasets", "fb15k-237"]) == 0
    assert (out / "fb15k-237" / "entity_names.tsv").read_bytes() == (
        data_root / "fb15k-237" / "entity_names.tsv").read_bytes()
    # A corrupted copy is refused with a checksum error.
    bad = tmp_path / "bad" / "fb15k-237"
    bad.mkdir(parents=True)
    for name in ("train.txt", "valid.txt", "test.txt", "entity2text.txt"):
        (bad / name).write_bytes((data_root / "fb15k-237" / name).read_bytes())
    with (bad / "valid.txt").open("a") as f:
        f.write("x\ty\tz\n")
    source = download.SOURCES["fb15k-237"][1]
    with pytest.raises(download.FetchError, match="sha256 .* does not match"):
        download.obtain(source, bad.parent, {}, allow_unverified=False)


def test_download_offline_message(monkeypatch, capsys, tmp_path):
    download = _download_module()

    def offline(*args, **kwargs):
        raise download.urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    assert run_cli(download.main, ["--out", str(tmp_path), "--datasets", "wn18rr"],
                   user_errors=(download.FetchError,)) == 2
    err = capsys.readouterr().err
    assert "could not download" in err and "--from-local" in err


def test_unrecorded_checksum_needs_opt_in(tmp_path):
    download = _download_module()
    source = download.Source("x/file.json", "unused", None)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file.json").write_text("{}")
    with pytest.raises(download.FetchError, match="no recorded sha256"):
        download.obtain(source, tmp_path, {}, allow_unverified=False)
    assert download.obtain(source, tmp_path, {}, allow_unverified=True) == b"{}"
