"""Corpus readers: each yields `RawDoc`s, streaming, with the file and line (or page) they came from.

Formats: plain text (one document a line), JSONL (a configurable text field), Parquet (a text
column) and MediaWiki XML dumps (`.xml`, `.xml.bz2`), whose `[[links]]` become entity mentions.
Text, JSONL and dumps may be compressed (`.gz`, `.bz2`, `.zst`: decompressed while streaming). A folder stands for every corpus file of a known type under it, in sorted order (a Parquet
folder, a folder of JSONL shards); a folder that Hugging Face `datasets` wrote with `save_to_disk`
(a Dataset, or a DatasetDict: its splits in their saved order) is read through `datasets`, which
memory-maps its Arrow files, a batch of rows at a time.
A malformed record raises `DataError` naming the file and line and what to do, or, with
`on_error="skip"`, is counted under its reason and skipped.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import re
import unicodedata
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

from data_prep.wikitext import WikiLink, strip_wikitext


class DataError(ValueError):
    """Bad input: the message names the file, the line and what to do."""


INVALID_REASONS = ("invalid_utf8", "malformed_json", "missing_text_field")
LINK_NOTES = ("links_realigned", "links_unaligned", "links_unlinked", "links_overlapping")
"""Counted in the readers' `rejected` counter but about gold entity links, not documents (linked-text
JSONL): a link whose offsets did not hold its surface form and was moved to the nearest occurrence of
it; one whose surface form the text does not hold (left out); one without an entity id (left out); one
overlapping an earlier one (left out)."""
"""Rejections of records that are broken (skipped with on_error="skip"), as opposed to records
filtered by design (empty, duplicate, redirect, not_an_article): `max_rejected_fraction` bounds these."""


@dataclass
class RawDoc:
    text: str
    source: str
    """file:line (or file:page title) of the record."""
    links: list[WikiLink] = field(default_factory=list)
    """Wiki links as character spans of `text` (MediaWiki dumps only)."""
    part: int = 0
    """A document longer than max_doc_chars is cut into pieces: this one's position among them."""
    last: bool = True
    """Whether this piece ends its document (only the last piece is followed by EOS)."""
    key: int | None = None
    """The whole document's content hash when this is a piece, so that all pieces go to one split."""


COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd"}
"""Compressed text and JSONL: suffix -> pyarrow codec."""

CORPUS_SUFFIXES = (".txt", ".text", ".jsonl", ".json", ".parquet", ".xml")
"""What a corpus file in a folder may be called (each also with a COMPRESSION suffix, Parquet excepted)."""


def _compression(path: Path) -> str | None:
    return COMPRESSION.get(path.suffix.lower())


def corpus_format(path: Path) -> str:
    if is_hf_dataset(path):
        return "datasets"
    name = path.name.lower()
    if _compression(path):
        name = name[: -len(path.suffix)]
    if name.endswith(".xml"):
        return "mediawiki"
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def is_hf_dataset(path: Path) -> bool:
    """A folder Hugging Face `datasets` wrote with save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json"))


def _is_corpus_file(path: Path) -> bool:
    name = path.name.lower()
    stem = name[: -len(path.suffix)] if _compression(path) else name
    return stem.endswith(CORPUS_SUFFIXES) and not (stem.endswith(".parquet") and stem != name)


def expand_corpus(entries: list[str]) -> list[Path]:
    """The corpus inputs as the readers take them: a file as it is; a `datasets` folder as it is;
    any other folder as every corpus file under it, sorted by path (hidden files and folders
    excluded). A missing input, or a folder holding no corpus file or files of other types, is a
    DataError naming them and the fix."""
    out: list[Path] = []
    for entry in entries:
        path = Path(entry)
        if path.is_file() or is_hf_dataset(path):
            out.append(path)
            continue
        if not path.is_dir():
            raise DataError(f"{path}: no such corpus file or folder; check the path")
        files = sorted(
            f
            for f in path.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
        other = [f for f in files if not _is_corpus_file(f)]
        if other:
            raise DataError(
                f"{path}: a corpus folder holds only corpus files ({', '.join(CORPUS_SUFFIXES)}, text and "
                f"JSONL also compressed: {', '.join(COMPRESSION)}); it also holds {len(other)} other file(s), "
                f"e.g. {other[0]}: move them out, or name the corpus files one by one"
            )
        if not files:
            raise DataError(f"{path}: the folder holds no corpus file; check the path")
        out += files
    return out


def _open_binary(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed while read where its suffix names a codec: gzip and bz2 by the
    standard library (which reads every member of a multi-member file, as pigz and pbzip2 write them),
    zstd by pyarrow's codec."""
    codec = _compression(path)
    if codec is None:
        return open(path, "rb")
    if codec == "gzip":
        return cast(IO[bytes], gzip.open(path, "rb"))
    if codec == "bz2":
        return bz2.open(path, "rb")
    import pyarrow as pa

    return io.BufferedReader(pa.input_stream(str(path), compression=codec))


def _bad(rejected: Counter | None, reason: str, message: str) -> None:
    if rejected is None:
        raise DataError(message)
    rejected[reason] += 1


def read_text(path: Path, rejected: Counter | None) -> Iterator[RawDoc]:
    with _open_binary(path) as f:
        for lineno, raw in _lines(f, path):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _bad(
                    rejected,
                    "invalid_utf8",
                    f"{path}:{lineno}: invalid UTF-8 at byte {e.start}; re-encode the file as UTF-8 "
                    "or pass --on_error skip",
                )
                continue
            yield RawDoc(line, f"{path}:{lineno}")


def _lines(f: IO[bytes], path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a file, with a decompression error named as the file's."""
    lineno = 0
    try:
        for lineno, raw in enumerate(f, 1):
            yield lineno, raw
    except (OSError, EOFError) as e:  # a truncated or damaged archive
        raise DataError(
            f"{path}:{lineno + 1}: cannot decompress ({e}); the archive is damaged or truncated"
        ) from e


def read_jsonl(
    path: Path, text_field: str, rejected: Counter | None, notes: Counter | None = None
) -> Iterator[RawDoc]:
    """Records of a JSONL file: the text field; a linked-text record's entities become its links
    (counted in notes by LINK_NOTES)."""
    for doc in read_text(path, rejected):
        if not doc.text.strip():
            yield doc  # counted as empty by ingest
            continue
        try:
            record = json.loads(doc.text)
        except json.JSONDecodeError as e:
            _bad(
                rejected,
                "malformed_json",
                f"{doc.source}: malformed JSON ({e.msg} at column {e.colno}); "
                "fix the line or pass --on_error skip",
            )
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            _bad(
                rejected,
                "missing_text_field",
                f"{doc.source}: no string field {text_field!r}; set --text_field "
                "to the field holding the text, or pass --on_error skip",
            )
            continue
        entities = record.get("entities")
        if isinstance(entities, list) and entities:
            links = _gold_links(entities, text, doc.source, rejected, notes)
            if links is None:
                continue
            yield RawDoc(text, doc.source, links)
        else:
            yield RawDoc(text, doc.source)


def _gold_links(
    entities: list, text: str, where: str, rejected: Counter | None, notes_out: Counter | None
) -> list[WikiLink] | None:
    """A linked-text record's entity mentions (REBEL / T-REx: {uri, boundaries: [start, end],
    surfaceform}) as links. Offsets that do not hold the surface form are tried as UTF-8 byte offsets,
    then the surface form's occurrence nearest them is taken (links_realigned); a surface form the text
    does not hold, or a mention without an entity id, is left out and counted (LINK_NOTES). Overlapping
    mentions keep the first (links_overlapping). None: a malformed record (reported as malformed_json)."""
    notes: Counter = Counter()
    links: list[WikiLink] = []
    encoded: bytes | None = None
    for e in entities:
        if not isinstance(e, dict) or not isinstance(e.get("boundaries"), list) or len(e["boundaries"]) != 2:
            _bad(
                rejected,
                "malformed_json",
                f"{where}: an entity is not {{uri, boundaries: [start, end], surfaceform}}",
            )
            return None
        uri, form, (start, end) = e.get("uri"), e.get("surfaceform"), e["boundaries"]
        if not isinstance(start, int) or not isinstance(end, int):
            _bad(rejected, "malformed_json", f"{where}: entity boundaries {e['boundaries']} are not integers")
            return None
        if uri in (None, "", "None"):
            notes["links_unlinked"] += 1
            continue
        if not isinstance(form, str) or not form:
            form = text[start:end] if 0 <= start < end <= len(text) else ""
        if not form:  # no surface form, and offsets that hold no text
            notes["links_unaligned"] += 1
            continue
        if text[start:end] != form:
            encoded = text.encode() if encoded is None else encoded
            if encoded[start:end] == form.encode():  # UTF-8 byte offsets
                start = len(encoded[:start].decode(errors="ignore"))
            else:
                found = [m.start() for m in re.finditer(re.escape(form), text)] if form else []
                if not found:
                    notes["links_unaligned"] += 1
                    continue
                start = min(found, key=lambda i: (abs(i - start), i))
            end = start + len(form)
            notes["links_realigned"] += 1
        links.append(WikiLink(start, end, str(uri)))
    links.sort(key=lambda link: (link.start, -link.end))
    kept: list[WikiLink] = []
    for link in links:
        if not kept or link.start >= kept[-1].end:
            kept.append(link)
        else:
            notes["links_overlapping"] += 1
    if notes_out is not None:
        notes_out.update(notes)
    return kept


def read_parquet(path: Path, text_field: str, rejected: Counter | None) -> Iterator[RawDoc]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (have {pf.schema_arrow.names}); set --text_field")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                _bad(rejected, "missing_text_field", f"{path}:row {row}: {text_field!r} is not a string")
                continue
            yield RawDoc(text, f"{path}:row {row}")


def read_mediawiki(path: Path, filtered: Counter) -> Iterator[RawDoc]:
    """Stream <page>s of a dump; articles (namespace 0) that are not redirects become documents.
    Other pages are not errors: they are counted in `filtered` by reason."""
    with _open_binary(path) as f:
        title = ns = None
        redirect = False
        try:
            for _, elem in ET.iterparse(f, events=("end",)):
                tag = elem.tag.rsplit("}", 1)[-1]
                if tag == "title":
                    title = elem.text or ""
                elif tag == "ns":
                    ns = elem.text
                elif tag == "redirect":
                    redirect = True
                elif tag == "text":
                    markup = elem.text or ""
                    if ns != "0":
                        filtered["not_an_article"] += 1
                    elif redirect:
                        filtered["redirect"] += 1
                    else:
                        text, links = strip_wikitext(unicodedata.normalize("NFC", markup))
                        yield RawDoc(text, f"{path}:{title}", links)
                elif tag == "page":
                    title, ns, redirect = None, None, False
                    elem.clear()
        except ET.ParseError as e:
            raise DataError(
                f"{path}:{e.position[0]}: malformed XML ({e}); is this a complete MediaWiki dump?"
            ) from e


def read_hf_dataset(path: Path, text_field: str, rejected: Counter | None) -> Iterator[RawDoc]:
    """Rows of a `datasets` folder (save_to_disk), a batch at a time from its memory-mapped Arrow
    files; a DatasetDict's splits in their saved order."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    parts = list(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for split, ds in parts:
        where = f"{path}[{split}]" if split is not None else str(path)
        if text_field not in ds.column_names:
            raise DataError(f"{where}: no column {text_field!r} (have {ds.column_names}); set --text_field")
        row = 0
        for batch in ds.select_columns([text_field]).iter(batch_size=4096):
            for text in batch[text_field]:
                row += 1
                if not isinstance(text, str):
                    _bad(rejected, "missing_text_field", f"{where}:row {row}: {text_field!r} is not a string")
                    continue
                yield RawDoc(text, f"{where}:row {row}")


def read_corpus(path: Path, text_field: str, rejected: Counter, on_error: str) -> Iterator[RawDoc]:
    """Documents of one corpus input (a file, or a `datasets` folder: see `expand_corpus` for other
    folders); what is filtered or skipped is added to `rejected`."""
    errors = rejected if on_error == "skip" else None
    fmt = corpus_format(path)
    if fmt == "datasets":
        yield from read_hf_dataset(path, text_field, errors)
        return
    if not path.is_file():
        raise DataError(f"{path}: no such corpus file; check the path")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; remove it from the inputs")
    if fmt == "mediawiki":
        yield from read_mediawiki(path, rejected)
    elif fmt == "jsonl":
        yield from read_jsonl(path, text_field, errors, notes=rejected)
    elif fmt == "parquet":
        yield from read_parquet(path, text_field, errors)
    else:
        yield from read_text(path, errors)
