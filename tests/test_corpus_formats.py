"""Corpus inputs where users keep them: compressed text and JSONL, folders of shards, Parquet folders,
Hugging Face `datasets` saved to disk. Each must give exactly the shards of the same documents in one
plain JSONL file (the reference), with the same accounting; broken ones an error naming the file."""

from __future__ import annotations

import bz2
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.example_world import WorldSpec, write_world
from data_prep.pipeline import DataError, PrepConfig, prepare_text

CFG = PrepConfig(vocab_size=256, seq_len=32)


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> list[str]:
    """The built-in world's documents, one duplicate and one empty record among them."""
    corpus = write_world(tmp_path_factory.mktemp("raw"), WorldSpec(documents=240))["corpus"]
    lines = corpus.read_text().splitlines()
    return lines[:100] + [lines[5], ""] + lines[100:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, docs) -> tuple[dict, dict[str, bytes]]:
    """The manifest and the shard files of the documents as one plain JSONL file."""
    tmp = tmp_path_factory.mktemp("ref")
    plain = tmp / "corpus.jsonl"
    plain.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return _prepare([plain], tmp / "out")


def _prepare(corpus, out) -> tuple[dict, dict[str, bytes]]:
    m = prepare_text(corpus, out, CFG, log=lambda *_: None)
    shards = {f.name: f.read_bytes() for f in sorted(out.iterdir()) if f.suffix in (".bin", ".npy", ".model")}
    return m, shards


def _jsonl(docs: list[str]) -> bytes:
    return "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()


def _write_zstd(path, data: bytes) -> None:
    with pa.output_stream(str(path), compression="zstd") as f:
        f.write(data)


def _same(reference, got) -> None:
    (want_m, want), (m, have) = reference, got
    assert len(want) >= 3 and have == want  # byte-identical shards, tokenizer, span tables
    for key in ("documents_in", "documents_written", "documents_rejected", "tokens"):
        assert m[key] == want_m[key], key


@pytest.mark.parametrize("codec", ["gz", "bz2", "zst"])
def test_compressed_jsonl_and_text_give_the_plain_shards(tmp_path, docs, reference, codec):
    data = _jsonl(docs)
    text = ("\n".join(docs) + "\n").encode()
    for name, raw in (("c.jsonl", data), ("c.txt", text)):
        path = tmp_path / f"{name}.{codec}"
        # two members / streams, as pigz and pbzip2 write them: every one must be read
        cut = raw.index(b"\n", len(raw) // 2) + 1
        if codec == "gz":
            path.write_bytes(gzip.compress(raw[:cut]) + gzip.compress(raw[cut:]))
        elif codec == "bz2":
            path.write_bytes(bz2.compress(raw[:cut]) + bz2.compress(raw[cut:]))
        else:
            _write_zstd(path, raw)
        _same(reference, _prepare([path], tmp_path / f"out_{name}"))


def test_a_folder_of_shards_reads_every_file_sorted(tmp_path, docs, reference):
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    # sorted by path: a.jsonl.gz, b/c.txt, b/d.jsonl; hidden files are not corpus files
    (folder / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(docs[:50])))
    (folder / "b" / "c.txt").write_text("\n".join(docs[50:120]) + "\n")
    (folder / "b" / "d.jsonl").write_bytes(_jsonl(docs[120:]))
    (folder / ".DS_Store").write_bytes(b"\0")
    _same(reference, _prepare([folder], tmp_path / "out"))

    (folder / "notes.md").write_text("not a corpus\n")
    with pytest.raises(
        DataError, match=r"corpus: a corpus folder holds only corpus files .*notes\.md: move them out"
    ):
        prepare_text([folder], tmp_path / "out2", CFG, log=lambda *_: None)


def test_a_parquet_folder(tmp_path, docs, reference):
    folder = tmp_path / "parquet"
    folder.mkdir()
    for i, part in enumerate((docs[:90], docs[90:])):
        pq.write_table(
            pa.table({"id": list(range(len(part))), "text": part}), folder / f"part-{i:05d}.parquet"
        )
    _same(reference, _prepare([folder], tmp_path / "out"))


def test_a_datasets_folder_saved_to_disk_is_streamed(tmp_path, docs, reference):
    import datasets

    whole = datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))})
    whole.save_to_disk(str(tmp_path / "ds"))
    _same(reference, _prepare([tmp_path / "ds"], tmp_path / "out"))

    # a DatasetDict: its splits in their saved order
    parts = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": docs[:130]}),
            "test": whole.select(range(130, len(docs))),
        }
    )
    parts.save_to_disk(str(tmp_path / "dd"))
    _same(reference, _prepare([tmp_path / "dd"], tmp_path / "out_dd"))

    with pytest.raises(DataError, match=r"dd\[train\]: no column 'body'"):
        prepare_text([tmp_path / "dd"], tmp_path / "o", PrepConfig(text_field="body"), log=lambda *_: None)


def test_a_damaged_archive_names_the_file(tmp_path, docs):
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl(docs))[:600])
    with pytest.raises(DataError, match=r"c.jsonl.gz:\d+: cannot decompress"):
        prepare_text([path], tmp_path / "o", CFG, log=lambda *_: None)
    assert not (tmp_path / "o").exists()
