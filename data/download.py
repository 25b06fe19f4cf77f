"""Fetch the official data files, verify their sha256, and lay them out for the code.

    python data/download.py --out data/prepared                      # needs internet
    python data/download.py --out data/prepared --from-local DIR     # offline: copy + verify

The result is the layout the code reads (point ``--data-dir`` or ``$KGQA_DATA_DIR`` at it):

    fb15k-237/{train,valid,test}.txt entity_names.tsv
    wn18rr/{train,valid,test}.txt entity_names.tsv
    webqsp/WebQSP.{train,test}.json
    webqsp/hitter_format/..., freebaseqa/hitter_format/...   (HittER's released QA splits)
    freebaseqa/FreebaseQA-{train,dev,eval}.json               (official FreebaseQA release)

Nothing is downloaded unless this script is run. Every file is checked against the sha256 in
``SOURCES``; a file whose checksum is not yet recorded (the official FreebaseQA JSON, see
data/README.md) is refused unless ``--allow-unverified`` is given, and its sha256 is printed
so that it can be recorded.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

CONVE = "https://github.com/TimDettmers/ConvE/raw/f3c0eb286025410fa5b4c04696c918264163d0ca"
KGBERT = (
    "https://raw.githubusercontent.com/yao8839836/kg-bert/"
    "0b8f625108efcb9b43603b6840f2548ff3d3c973/data"
)
RELPHORMER = (
    "https://raw.githubusercontent.com/zjunlp/Relphormer/"
    "4231e7d0f63024e67da0a347750c098372fc99c7/QA"
)
FREEBASEQA = "https://raw.githubusercontent.com/kelvin-jiang/FreebaseQA/master"
WEBQSP = (
    "https://download.microsoft.com/download/F/5/0/"
    "F5012144-A4FB-4084-897F-CFDA99C60BDF/WebQSP.zip"
)


@dataclass(frozen=True)
class Source:
    """One official file: where it comes from, where it goes, and its sha256 (None: unknown)."""

    dest: str  # path under --out
    url: str
    sha256: str | None
    member: str | None = None  # member of an archive at `url`
    archive_sha256: str | None = None


def _kg(name: str, archive: str, archive_sha: str, shas: dict[str, str]) -> list[Source]:
    return [
        Source(f"{name}/{split}.txt", f"{CONVE}/{archive}", sha, f"{split}.txt", archive_sha)
        for split, sha in shas.items()
    ]


def _qa(dataset: str, upstream: str, files: dict[str, str]) -> list[Source]:
    return [
        Source(f"{dataset}/hitter_format/{f}", f"{RELPHORMER}/{upstream}/{f}", sha)
        for f, sha in files.items()
    ]


SOURCES: dict[str, list[Source]] = {
    "fb15k-237": _kg("fb15k-237", "FB15k-237.tar.gz",
                     "311df7930f842a02979eaa7a802484a6afe62303c07f915f1e6edbc30cbe05e8", {
        "train": "6e4c2782169af21e9743f3b1d200886f5d595bf6bc504ec1351720949c5cdfae",
        "valid": "cf6309010852f6a8d47a45df830a426415d1ee6f7a3970a8376ff1fb81db4a5c",
        "test": "5711cf41623ceb4eacc50eb6108a3ca6565c7492e3caaf82a3e355cc660d1574",
    }) + [
        Source("fb15k-237/entity2text.txt", f"{KGBERT}/FB15k-237/entity2text.txt",
               "16beedcfad3d32696e8b0b98cfa0f5eeb144f5142225f227a64fd9ce37447da5"),
    ],
    "wn18rr": _kg("wn18rr", "WN18RR.tar.gz",
                  "1eb9152f804c140d163462c0d49f65e5a0b30ab5fbb375c5e3353c11a6249060", {
        "train": "038612e783c215ee5f3ca9fbfca27b8d0739be1028fe4ee7c174aecf0b83d5df",
        "valid": "453ce7202afa58094a04d2b1560ee2b02660f1c260b32ce6651c8ccedd1028ab",
        "test": "0383bceaaa1096cf3c03ec021ed0048068e2355dbfc0239b292cefdac821cec5",
    }) + [
        Source("wn18rr/entity2text.txt", f"{KGBERT}/WN18RR/entity2text.txt",
               "8f5c6f11753dafa879917b9bdf73d398ceb3bd4bed8d5553177e1e0f2c37521f"),
    ],
    "webqsp": [
        Source("webqsp/WebQSP.train.json", WEBQSP,
               "a01f87fa7808d2e90ccdf758b8eefbb882f3f92a8f386058ad6fd153c1589ed0",
               "WebQSP/data/WebQSP.train.json",
               "ee70ff1a90eb0be819e058f9f60107a2c8ccc0a14e0e307f394a5b332eea7d64"),
        Source("webqsp/WebQSP.test.json", WEBQSP,
               "856f50eb1ede43b799b10ddd0a980e72c88475b1a2259491af57e5db410ded52",
               "WebQSP/data/WebQSP.test.json",
               "ee70ff1a90eb0be819e058f9f60107a2c8ccc0a14e0e307f394a5b332eea7d64"),
    ] + _qa("webqsp", "webqsp", {
        "relphormer-filtered/train.json":
            "f88f31e708d75657115a7d3ff09b3148f38be54dfada1e4869bc62a22c0354b5",
        "relphormer-filtered/test.json":
            "a1d7481194d947b0d47ba32ea68aea3a764948dcceb946e3cb947773b745b574",
        "relphormer/train.json": "aaacb572aa81a592b9d4223dc1bf6c47f0bae7a493b0d32e9daac137498a1618",
        "relphormer/test.json": "30d80e69a661989bb3f3a2f1328a883f0cd061a34b37ff43a850b9b98917de53",
    }),
    "freebaseqa": [
        # Official release; sha256 not recorded yet (no copy could be verified offline).
        Source(f"freebaseqa/FreebaseQA-{s}.json", f"{FREEBASEQA}/FreebaseQA-{s}.json", None)
        for s in ("train", "dev", "eval")
    ] + _qa("freebaseqa", "fbqa", {
        "relphormer-filtered/train.json":
            "9742187548c89db7b0e2426076245926a944b9fcf9e4d47bd6b4a11d453d95b8",
        "relphormer-filtered/dev.json":
            "e3784f301670a9efe15381527b02f16a9349a893da14f4fbdf87d49669a45590",
        "relphormer-filtered/test.json":
            "ab406b69c5f3bd2053d374edbb8df5257327a49219fff1b700ecf964ca70e465",
        "relphormer/dev.json": "aac5476853e45f747395815bb4f187fd067910b78afdc1fdeaeb5f954e50c5dd",
        "relphormer/test.json": "ea83fcf4a5418d653f9a11c9c048aef1b6a22dd4f7dd5773daee2670d9b1fa7c",
    }),
}


class FetchError(RuntimeError):
    pass


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fetch_url(url: str, cache: dict[str, bytes]) -> bytes:
    if url not in cache:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                cache[url] = response.read()
        except (urllib.error.URLError, OSError) as e:
            raise FetchError(
                f"could not download {url} ({e}).\nOffline? Fetch the file on a machine with "
                f"internet and rerun with --from-local DIR, where DIR has the layout shown "
                f"in data/README.md."
            ) from e
    return cache[url]


def _extract(archive: bytes, member: str) -> bytes:
    if archive[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(archive)) as z:
            return z.read(member)
    with tarfile.open(fileobj=io.BytesIO(archive)) as t:
        for info in t.getmembers():
            if info.isfile() and info.name.lstrip("./") == member:
                return t.extractfile(info).read()
    raise FetchError(f"{member} not found in archive")


def obtain(source: Source, local: Path | None, cache: dict[str, bytes], allow_unverified: bool,
           ) -> bytes:
    """The bytes of one file, from ``local/<dest>`` or from its URL, checksum-verified."""
    if local is not None:
        path = local / source.dest
        if not path.is_file():
            raise FetchError(f"{path}: missing (expected for {source.dest}; official URL "
                             f"{source.url})")
        data = path.read_bytes()
    else:
        blob = _fetch_url(source.url, cache)
        if source.member is not None:
            if source.archive_sha256 and sha256(blob) != source.archive_sha256:
                raise FetchError(f"{source.url}: archive sha256 {sha256(blob)} != "
                                 f"{source.archive_sha256}")
            data = _extract(blob, source.member)
        else:
            data = blob
    digest = sha256(data)
    if source.sha256 is None:
        if not allow_unverified:
            raise FetchError(f"{source.dest}: no recorded sha256 (got {digest}); rerun with "
                             f"--allow-unverified to accept it, and record it in SOURCES")
        print(f"  unverified {source.dest}: sha256 {digest}", file=sys.stderr)
    elif digest != source.sha256:
        raise FetchError(f"{source.dest}: sha256 {digest} does not match the recorded "
                         f"{source.sha256}; the file is corrupt or a different version")
    return data


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
        tmp.write(data)
    Path(tmp.name).replace(path)


def write_entity_names(directory: Path) -> None:
    """``entity_names.tsv`` (id<TAB>display name) for the entities of the graph, from KG-BERT's
    ``entity2text.txt``; for WordNet the text is "lemma, gloss" and the lemma is kept."""
    entities: dict[str, None] = {}
    for split in ("train", "valid", "test"):
        for line in (directory / f"{split}.txt").read_text(encoding="utf-8").splitlines():
            h, _, t = line.split("\t")
            entities.setdefault(h)
            entities.setdefault(t)
    text = {}
    for line in (directory / "entity2text.txt").read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition("\t")
        text[key] = value.split(",")[0].strip() if directory.name == "wn18rr" else value.strip()
    rows = "".join(f"{e}\t{text.get(e, e)}\n" for e in entities)
    write_atomic(directory / "entity_names.tsv", rows.encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--from-local", type=Path, help="take files from this directory "
                        "(same layout) instead of downloading; checksums are still verified")
    parser.add_argument("--datasets", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    parser.add_argument("--allow-unverified", action="store_true",
                        help="accept files whose sha256 is not recorded (prints it)")
    args = parser.parse_args(argv)

    cache: dict[str, bytes] = {}
    for name in args.datasets:
        print(f"{name}:")
        for source in SOURCES[name]:
            write_atomic(args.out / source.dest,
                         obtain(source, args.from_local, cache, args.allow_unverified))
            print(f"  ok {source.dest}")
        if name in ("fb15k-237", "wn18rr"):
            write_entity_names(args.out / name)
            print(f"  wrote {name}/entity_names.tsv")
    print(f"done: point --data-dir (or $KGQA_DATA_DIR) at {args.out}")
    return 0


if __name__ == "__main__":  # a FetchError is one line "error: ...", status 2, as every command
    from hitter_core.cli import run_cli

    sys.exit(run_cli(main, user_errors=(FetchError,)))
