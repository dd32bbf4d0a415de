"""Issue 13, the data side: data_prep destroys nothing it did not write, loads no pickle, bounds
hostile input, fails loudly (bad configs, mostly-invalid corpora, a full disk); PackedDataset opens
only files inside its folder and checks them against the manifest. Real files, real processes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from data_prep.example_world import WorldSpec, write_world
from data_prep.pipeline import EOS_ID, DataError, PrepConfig, prepare_text
from data_prep.readers import RawDoc
from data_prep.wikitext import WikiLink
from sparsexpert.data import PackedDataset
from sparsexpert.data.format import FORMAT, FORMAT_PREFIX, VERSION

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--vocab_size", "300", "--seq_len", "32", "--chunk_docs", "50"]


def _cli(*args: str, umask: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
    )


def _world(folder: Path, documents: int = 300) -> list[str]:
    w = write_world(folder, WorldSpec(documents=documents))
    return [
        "--corpus",
        str(w["corpus"]),
        "--kg",
        str(w["kg"]),
        "--aliases",
        str(w["aliases"]),
        "--case",
        "exact",
    ]


def test_output_that_is_not_ours_is_refused_and_inputs_are_never_deleted(tmp_path):
    mine = tmp_path / "mine"  # the user's folder: the inputs and a note
    inputs = _world(mine)
    (mine / "notes.txt").write_text("precious")
    before = sorted(p.name for p in mine.iterdir())
    for extra in ([], ["--overwrite"]):
        proc = _cli("run", *inputs, *SMALL, "--output", str(mine), *extra)
        assert proc.returncode == 2, proc.stderr
        assert f"{mine / 'corpus.txt'}: an input inside {mine}" in proc.stderr
    assert sorted(p.name for p in mine.iterdir()) == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    proc = _cli("run", *inputs, *SMALL, "--output", str(other))
    assert proc.returncode == 2
    assert f"{other}: exists and is not a dataset written by data_prep" in proc.stderr
    assert "pass --overwrite to replace this one" in proc.stderr and (other / "notes.txt").is_file()

    # --overwrite replaces it, and the new folder follows the umask (a temporary folder is 0700).
    proc = _cli("run", *inputs, *SMALL, "--output", str(other), "--overwrite", umask=0o027)
    assert proc.returncode == 0, proc.stderr
    assert not (other / "notes.txt").exists() and (other / "manifest.json").is_file()
    assert other.stat().st_mode & 0o777 == 0o750

    # An earlier dataset of ours is replaced (with nothing left beside it); one holding a file
    # data_prep did not write is not.
    assert _cli("run", *inputs, *SMALL, "--output", str(other), "--seq_len", "48").returncode == 0
    assert PackedDataset(other, "train").seq_len == 48
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "other", "other.kgindex"]  # the KG's index
    (other / "notes.txt").write_text("mine now")
    proc = _cli("run", *inputs, *SMALL, "--output", str(other))
    assert proc.returncode == 2 and "holds files data_prep did not write (notes.txt)" in proc.stderr


def test_parts_folder_holds_no_pickle(tmp_path):
    inputs = _world(tmp_path / "raw", documents=150)
    # an entity with an alias but no triple: in the KG index, not in the KG's vocabulary, named by the index
    with open(tmp_path / "raw" / "aliases.tsv", "a") as f:
        f.write("Zed_Nobody\tZed Nobody\n")
    corpus = tmp_path / "raw" / "corpus.txt"
    corpus.write_text("Zed Nobody was seen there. " + corpus.read_text())
    out = tmp_path / "data"
    assert _cli("run", *inputs, *SMALL, "--output", str(out), "--keep_parts").returncode == 0
    assert "\tZed_Nobody\tZed Nobody\n" in (out / "entities.tsv").read_text()
    chunks = sorted((tmp_path / "data.parts" / "chunks").iterdir())
    assert [p.suffix for p in chunks] == [".npz"] * 3
    with np.load(chunks[0], allow_pickle=False) as z:  # plain arrays: loads without pickle
        assert sorted(z.files) == ["doc_info", "entity_ids", "ids", "meta", "spans", "triples"]
        arrays = {k: z[k] for k in z.files}
    # format /2 named every entity (meta.entities), /3 only those the KG index lacks: a /2 chunk still packs,
    # to the same dataset
    from data_prep.kg_index import KGIndex

    index = KGIndex.open(tmp_path / "data.kgindex")
    meta = json.loads(arrays["meta"].tobytes())
    assert meta["format"] == "sparsexpert-chunk/3" and len(meta["names"]) < len(arrays["entity_ids"])
    unindexed = iter(meta.pop("names"))
    meta["entities"] = [index.names[i] if i >= 0 else next(unindexed) for i in arrays["entity_ids"].tolist()]
    old = {
        **arrays,
        "meta": np.frombuffer(json.dumps({**meta, "format": "sparsexpert-chunk/2"}).encode(), np.uint8),
    }
    np.savez(chunks[0], **old)

    def dataset() -> dict[str, bytes]:
        return {
            p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".json" or p.name == "stats.json"
        }

    want = dataset()
    assert _cli("merge", *inputs, *SMALL, "--output", str(out), "--keep_parts").returncode == 0
    assert dataset() == want and "entities.tsv" in want
    marker = tmp_path / "code_ran"
    evil = b"cposix\nmkdir\n(" + f"V{marker}\n".encode() + b"tR."  # pickle for os.mkdir(marker)
    (tmp_path / "data.parts" / "chunks" / "chunk_0000000.pkl").write_bytes(evil)
    proc = _cli("merge", *inputs, *SMALL, "--output", str(out))
    assert proc.returncode == 2 and not marker.exists()
    assert "old pickle format (chunk_0000000.pkl" in proc.stderr
    assert f"delete the folder {tmp_path / 'data.parts'}" in proc.stderr
    # a chunk of an older format (no entity ids) is refused before the join would skip it as done
    (tmp_path / "data.parts" / "chunks" / "chunk_0000000.pkl").unlink()
    meta = json.loads(arrays["meta"].tobytes())
    arrays["meta"] = np.frombuffer(json.dumps({**meta, "format": "sparsexpert-chunk/1"}).encode(), np.uint8)
    del arrays["entity_ids"]
    np.savez(chunks[0], **arrays)
    proc = _cli("join", *inputs, *SMALL, "--output", str(out))
    assert proc.returncode == 2, proc.stderr
    assert "chunk format 'sparsexpert-chunk/1', expected sparsexpert-chunk/3" in proc.stderr
    assert f"delete the parts folder {tmp_path / 'data.parts'}" in proc.stderr


def _copy(example_data: Path, tmp_path: Path) -> tuple[Path, dict]:
    copy = tmp_path / "d"
    shutil.copytree(example_data, copy)
    (copy / ".verified.json").unlink(missing_ok=True)
    return copy, json.loads((copy / "manifest.json").read_text())


def test_manifest_file_names_stay_inside_the_dataset(example_data, tmp_path):
    copy, manifest = _copy(example_data, tmp_path)
    shard = manifest["splits"]["train"]["shards"][0]
    outside = tmp_path / "outside.bin"
    shutil.copyfile(copy / shard["file"], outside)
    (copy / "link.bin").symlink_to(outside)
    for name in ("../outside.bin", str(outside), "link.bin"):
        shard["file"] = name
        (copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(
            ValueError, match=rf"manifest.json: splits.train.shards\[0\].file='{name}' leads out"
        ):
            PackedDataset(copy, "train")
    shard["file"] = "train_00000.bin"
    manifest["tokenizer"]["file"] = "../../tokenizer.model"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="tokenizer.file='../../tokenizer.model' leads out"):
        PackedDataset(copy, "train")


def test_a_manifest_of_another_format_is_refused_not_misread(example_data, tmp_path):
    """The format's version is checked where the dataset is opened: a newer one (whose files this reader
    might misread) and a manifest that is not data_prep's are refused with what to do."""
    copy, manifest = _copy(example_data, tmp_path)
    assert manifest["format"] == FORMAT
    PackedDataset(copy, "train")
    for fmt, message in (
        (f"{FORMAT_PREFIX}{VERSION + 1}", "is newer than this sparsexpert reads"),
        ("other-tool/1", "is not a dataset written by data_prep"),
        (None, "is not a dataset written by data_prep"),
    ):
        manifest["format"] = fmt
        (copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match=rf"manifest.json: format.*{message}"):
            PackedDataset(copy, "train")


def test_shards_are_checked_against_the_manifest_at_load(example_data, tmp_path):
    copy, manifest = _copy(example_data, tmp_path)
    vocab = manifest["tokenizer"]["vocab_size"]
    ds = PackedDataset(copy, "train")  # verified, and the result cached beside the shards
    assert json.loads((copy / ".verified.json").read_text())["shards"]["train_00000.bin"]["max_id"] < vocab
    shard = copy / "train_00000.bin"
    good = np.fromfile(shard, dtype=np.uint16)
    np.full_like(good, 65535).tofile(shard)  # same size: the size check alone let it through
    with pytest.raises(ValueError, match=r"train_00000.bin: its sha256 .* is not the one in manifest.json"):
        PackedDataset(copy, "train")  # the new mtime invalidates the cache
    # Not verified (data.verify=false): a batch with the bad id is an error naming shard and row.
    ds = PackedDataset(copy, "train", verify=False)
    with pytest.raises(
        ValueError, match=r"train_00000.bin: row 3 \(row 3 of split 'train'\) holds token id 65535"
    ):
        ds.rows(np.array([3]))
    # An id out of the vocabulary in a shard whose hash matches (say, another tokenizer's data).
    bad = good.copy()
    bad[5 * ds.seq_len + 7] = vocab
    bad.tofile(shard)
    manifest["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(bad.tobytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ValueError, match=rf"train_00000.bin: row 5 \(row 5 of split 'train'\) holds token id {vocab}"
    ):
        PackedDataset(copy, "train")


def test_prep_config_is_checked_whole(tmp_path):
    def run_config(**fields) -> subprocess.CompletedProcess:
        cfg = tmp_path / "prep.json"
        cfg.write_text(json.dumps({"corpus": ["c.txt"], "output": str(tmp_path / "o"), **fields}))
        return _cli("run", "--config", str(cfg))

    proc = run_config(vocab_sise=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "prep.json: vocab_sise=300: unknown field of PrepConfig; did you mean 'vocab_size'?" in proc.stderr
    proc = run_config(seq_len="32")
    assert proc.returncode == 2 and "seq_len='32': expected int" in proc.stderr
    proc = run_config(valid_fraction=1.5)
    assert proc.returncode == 2 and "valid_fraction=1.5: must be in [0, 1)" in proc.stderr
    for field, value, fix in [
        ("chunk_docs", 0, "must be >= 1"),
        ("rows_per_shard", 0, "must be >= 1"),
        ("workers", -1, "must be >= 1"),
        ("shard_index", -1, "must be in"),
        ("valid_fraction", -0.1, "must be in"),
        ("max_rejected_fraction", 2.0, "must be in"),
        ("max_doc_chars", 5_000_000, "SentencePiece drops longer texts"),
        ("tokenizer_type", "wordpiece", "use one of 'bpe', 'unigram'"),
        ("case", "lower", "use one of 'ignore', 'exact'"),
    ]:
        with pytest.raises(DataError, match=rf"^{field}={re.escape(repr(value))}: .*{re.escape(fix)}"):
            PrepConfig(corpus=["c.txt"], output="o", **{field: value}).validate()


def test_long_document_is_cut_into_pieces_of_one_document(tmp_path):
    words = [w for w in "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()]
    rng = np.random.default_rng(0)
    long = " ".join(words[i] for i in rng.integers(0, len(words), 2500))  # ~15 k characters
    corpus = tmp_path / "c.txt"
    corpus.write_text(long + "\n" + "\n".join(f"short document {i} about beta" for i in range(40)) + "\n")
    m = prepare_text(
        [corpus],
        tmp_path / "out",
        PrepConfig(vocab_size=60, seq_len=16, max_doc_chars=2000, valid_fraction=0.0),
        log=lambda *_: None,
    )
    assert m["documents_split"] == 1 and m["document_pieces"] == 8
    assert m["documents_in"] == m["documents_written"] == 41
    # The pieces follow one another with no EOS between them: the first document decodes whole.
    stream = PackedDataset(tmp_path / "out", "train").rows(np.arange(m["splits"]["train"]["rows"])).ravel()
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    assert sp.decode(stream[: list(stream).index(EOS_ID)].tolist()) == long
    assert PrepConfig().max_doc_chars == 1_000_000


def test_one_line_over_sentencepieces_limit_is_trained_on(tmp_path):
    """A 17 M-character line: whole, SentencePiece drops it (over 16 MiB) and, as the only document,
    fails with `!sentences_.empty()`. In pieces of max_doc_chars (1 M) it is trained on and packed."""
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    words = [bytes(rng.choice(letters, rng.integers(2, 9))).decode() for _ in range(2000)]
    line = " ".join(words[i] for i in rng.integers(0, len(words), 2_900_000))
    assert 2**24 < len(line) < 18_000_000
    corpus = tmp_path / "one_line.txt"
    corpus.write_text(line + "\n")
    out = tmp_path / "out"
    proc = _cli(
        "run", "--corpus", str(corpus), "--output", str(out), "--vocab_size", "300", "--seq_len", "128"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["documents_written"] == m["documents_split"] == 1 and m["document_pieces"] == 18, len(line)
    assert m["tokens"] > len(line) // 4


def test_split_document_keeps_links_and_cuts_at_whitespace():
    from data_prep.pipeline import split_document

    text = ("word " * 300) + "New York City" + (" word" * 400)
    start = text.index("New York")
    doc = RawDoc(text, "f:1", [WikiLink(0, 4, "Word"), WikiLink(start, start + 13, "NYC")])
    pieces = split_document(doc, 1000)  # a cut at 1000 would fall inside "New York City" (1500)
    assert "".join(p.text + " " for p in pieces)[:-1] == text
    assert [p.last for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert len({p.key for p in pieces}) == 1 and [p.part for p in pieces] == list(range(len(pieces)))
    surfaces = [(p.text[link.start : link.end], link.target) for p in pieces for link in p.links]
    assert surfaces == [("word", "Word"), ("New York City", "NYC")]
    assert all(len(p.text) <= 1000 for p in pieces)


def test_mostly_invalid_corpus_fails_with_the_counts(tmp_path):
    lines = []
    for i in range(812):
        if i % 135 == 0:  # 7 good records
            lines.append(
                json.dumps({"text": " ".join(f"word{j % 50} token{j * 7 % 30}" for j in range(i, i + 400))})
            )
        else:
            lines.append('{"text": broken ' + str(i))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    args = ["run", "--corpus", str(corpus), "--on_error", "skip", "--vocab_size", "64", "--seq_len", "32"]
    proc = _cli(*args, "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and not (tmp_path / "out").exists()
    assert "805 of 812 records (99.1%) are invalid (malformed_json 805)" in proc.stderr
    assert "raise --max_rejected_fraction" in proc.stderr
    proc = _cli(*args, "--output", str(tmp_path / "out"), "--max_rejected_fraction", "1")
    assert proc.returncode == 0 and "written 7, rejected: malformed_json 805" in proc.stdout


DISK_FULL = """
set -u
mount -t tmpfs -o size=1m tmpfs "$SMALL"
cd "$REPO"
py() {{ "$PYTHON" "$@"; }}
py -m data_prep tokenizer {args} --output "$SMALL/data" > /dev/null 2>&1 || exit 10
fill() {{ py -c "import os,sys; s=os.statvfs(sys.argv[1]); open(sys.argv[1]+'/ballast','wb').write(bytes(max(0, s.f_bavail*s.f_frsize-int(sys.argv[2]))))" "$SMALL" "$1"; }}
fill 8192     # the join stage has no room for its chunks
py -m data_prep join {args} --output "$SMALL/data" > "$T/join.out" 2>&1; echo $? > "$T/join.rc"
ls -A "$SMALL/data.parts/chunks" > "$T/join.ls"
rm "$SMALL/ballast"
py -m data_prep join {args} --output "$SMALL/data" > /dev/null 2>&1 || exit 11
fill 81920    # the parts fit, the dataset (~170 KiB) does not
py -m data_prep merge {args} --output "$SMALL/data" > "$T/merge.out" 2>&1; echo $? > "$T/merge.rc"
ls -A "$SMALL" > "$T/merge.ls"
rm "$SMALL/ballast"
py -m data_prep merge {args} --output "$SMALL/data" > "$T/again.out" 2>&1; echo $? > "$T/again.rc"
ls -A "$SMALL" > "$T/again.ls"
"""


def test_full_disk_is_reported_and_the_partial_work_removed(tmp_path):
    """On a real 1 MiB tmpfs, mounted in a private mount namespace (unshare: no root needed, gone
    when the script ends)."""
    args = " ".join([*_world(tmp_path / "raw"), *SMALL])
    small, t = tmp_path / "small", tmp_path / "report"
    small.mkdir()
    t.mkdir()
    env = {**os.environ, "SMALL": str(small), "T": str(t), "REPO": str(REPO), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", DISK_FULL.format(args=args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    read = lambda name: (t / name).read_text()  # noqa: E731
    assert read("join.rc").strip() == "2", read("join.out")
    assert f"{small / 'data.parts'}: No space left on device (ENOSPC) writing" in read("join.out")
    assert "the chunks already joined stay in" in read("join.out")
    assert not [n for n in read("join.ls").split() if n.endswith(".tmp")]  # no partial chunk left
    assert read("merge.rc").strip() == "2", read("merge.out")
    assert f"{small / 'data'}: No space left on device (ENOSPC) writing {small}/.data." in read("merge.out")
    assert " free there; the dataset needs about " in read("merge.out")
    assert "the dataset needs about" in read("merge.out") and "Traceback" not in read("merge.out")
    # no work folder, no half dataset; the KG index (complete) stays for the next run
    assert read("merge.ls").split() == ["ballast", "data.kgindex", "data.parts"]
    assert read("again.rc").strip() == "0", read("again.out")
    assert read("again.ls").split() == ["data", "data.kgindex"]
