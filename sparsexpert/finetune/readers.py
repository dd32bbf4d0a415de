"""Readers for fine-tuning data: NER (CoNLL/BIO or JSONL), text classification (JSONL or CSV) and
relation classification (JSONL with the character spans of two entity mentions). NER and classification
also read a split that Hugging Face `datasets` saved to disk (`save_to_disk`; e.g. conll2003's or
wnut_17's layout: `tokens` and integer `ner_tags` whose `ClassLabel` names the tags), mapping class ids
to their names.

Every reader returns a list of small dataclasses. Bad input raises `FinetuneDataError` naming the
file, the line and what to change.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.readers import is_hf_dataset

NER_TAG = re.compile(r"O|[BI]-\S+")
TAG_HELP = "tags must be 'O', 'B-<type>' or 'I-<type>' (BIO/IOB2)"


class FinetuneDataError(ValueError):
    """Bad fine-tuning input: the message names the file, the line and what to do."""


@dataclass
class NerExample:
    tokens: list[str]
    tags: list[str]


@dataclass
class ClassificationExample:
    text: str
    label: str


@dataclass
class RelationExample:
    text: str
    e1: tuple[int, int]
    """Character span [start, end) of the first entity mention in `text`."""
    e2: tuple[int, int]
    """Character span [start, end) of the second entity mention in `text`."""
    label: str


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """The file's lines, numbered from 1, decoded as UTF-8 (a leading BOM dropped), without line endings."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise FinetuneDataError(
                    f"{path}:{lineno}: invalid UTF-8 at byte {e.start}; re-encode the file as UTF-8"
                ) from None
            yield lineno, line.rstrip("\r\n")


def _json_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """The JSON objects of a JSONL file with their line numbers; blank lines are skipped."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise FinetuneDataError(
                f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); write one JSON object a line"
            ) from None
        if not isinstance(record, dict):
            raise FinetuneDataError(
                f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}; "
                "write one object a line"
            )
        yield lineno, record


def _field(path: Path, lineno: int, record: dict[str, Any], name: str) -> Any:
    if name not in record:
        raise FinetuneDataError(
            f"{path}:{lineno}: missing field {name!r} (fields: {sorted(record)}); "
            f"add it or name the right field"
        )
    return record[name]


def _check_tag(path: Path, lineno: int, tag: str) -> None:
    if not isinstance(tag, str) or not NER_TAG.fullmatch(tag):
        raise FinetuneDataError(f"{path}:{lineno}: bad tag {tag!r}; {TAG_HELP}")


def _no_examples(path: Path, what: str) -> FinetuneDataError:
    return FinetuneDataError(f"{path}: no {what} found; the file is empty or holds only blank lines")


def read_ner(path: str | Path) -> list[NerExample]:
    """The sentences of an NER file. A `.jsonl` file holds {"tokens": [...], "tags": [...]} a line; any
    other file is CoNLL/BIO: one token a line, the token in the first column and the tag in the last
    (columns split at tabs, or at whitespace when the line has no tab), a blank line between sentences,
    `-DOCSTART-` lines skipped, and a last sentence without a closing blank line kept."""
    path = Path(path)
    if path.is_dir():
        examples = list(_read_ner_dataset(path))
    else:
        examples = list(_read_ner_jsonl(path) if path.suffix == ".jsonl" else _read_conll(path))
    if not examples:
        raise _no_examples(path, "sentences")
    return examples


def _load_split(path: Path) -> Any:
    """A `datasets` split saved to disk. A DatasetDict's folder is refused naming its splits (each is
    a folder of its own: pass one)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise FinetuneDataError(
            f"{path}: a DatasetDict with the splits {splits}; pass one split's folder, e.g. {path / splits[0]}"
            if splits
            else f"{path}: a DatasetDict; pass one split's folder"
        )
    if not is_hf_dataset(path):
        raise FinetuneDataError(
            f"{path}: a folder, but not one Hugging Face datasets saved (no dataset_info.json); give a file "
            "or a folder written by Dataset.save_to_disk"
        )
    import datasets

    return datasets.load_from_disk(str(path))


def _class_names(ds: Any, column: str) -> list[str] | None:
    """The ClassLabel names of a column (or of the items of a list column), if it has them."""
    import datasets

    feature = ds.features[column]
    inner = getattr(feature, "feature", feature)  # Sequence(ClassLabel) or List(ClassLabel)
    return list(inner.names) if isinstance(inner, datasets.ClassLabel) else None


def _read_ner_dataset(path: Path) -> Iterator[NerExample]:
    ds = _load_split(path)
    tags_col = next((c for c in ("ner_tags", "tags") if c in ds.column_names), None)
    if "tokens" not in ds.column_names or tags_col is None:
        raise FinetuneDataError(
            f"{path}: an NER dataset needs the columns 'tokens' and 'ner_tags' (or 'tags'); it has "
            f"{ds.column_names}"
        )
    names = _class_names(ds, tags_col)
    for row, record in enumerate(ds.select_columns(["tokens", tags_col]), 1):
        tokens, tags = record["tokens"], record[tags_col]
        if names is not None:
            tags = [names[t] for t in tags]
        if not _is_str_list(tokens) or not _is_str_list(tags):
            raise FinetuneDataError(
                f"{path}:row {row}: 'tokens' must be strings and {tags_col!r} strings or ClassLabel ids"
            )
        if len(tokens) != len(tags):
            raise FinetuneDataError(f"{path}:row {row}: {len(tokens)} tokens but {len(tags)} tags")
        if not tokens:
            continue  # conll2003 holds empty rows where its -DOCSTART- lines were
        for tag in tags:
            _check_tag(path, row, tag)
        yield NerExample(list(tokens), list(tags))


def _read_conll(path: Path) -> Iterator[NerExample]:
    tokens: list[str] = []
    tags: list[str] = []
    for lineno, line in _lines(path):
        if line.startswith("-DOCSTART-"):
            continue
        if not line.strip():
            if tokens:
                yield NerExample(tokens, tags)
                tokens, tags = [], []
            continue
        line = line.rstrip()
        columns = [c.strip() for c in line.split("\t")] if "\t" in line else line.split()
        if len(columns) < 2:
            raise FinetuneDataError(
                f"{path}:{lineno}: expected 'token<TAB>tag', got 1 column ({line!r}); separate the token "
                "and its tag with a tab and sentences with a blank line"
            )
        if not columns[0]:
            raise FinetuneDataError(
                f"{path}:{lineno}: empty token in {line!r}; put the token in the first column"
            )
        _check_tag(path, lineno, columns[-1])
        tokens.append(columns[0])
        tags.append(columns[-1])
    if tokens:
        yield NerExample(tokens, tags)


def _read_ner_jsonl(path: Path) -> Iterator[NerExample]:
    for lineno, record in _json_records(path):
        tokens = _field(path, lineno, record, "tokens")
        tags = _field(path, lineno, record, "tags")
        if not _is_str_list(tokens) or not _is_str_list(tags):
            raise FinetuneDataError(
                f"{path}:{lineno}: 'tokens' and 'tags' must be lists of strings; fix the record"
            )
        if len(tokens) != len(tags):
            raise FinetuneDataError(
                f"{path}:{lineno}: {len(tokens)} tokens but {len(tags)} tags; give one tag per token"
            )
        if not tokens:
            raise FinetuneDataError(f"{path}:{lineno}: empty sentence; drop the line or give it tokens")
        for tag in tags:
            _check_tag(path, lineno, tag)
        yield NerExample(list(tokens), list(tags))


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _label(path: Path, lineno: int, value: Any, name: str) -> str:
    """A label as a string: JSON strings as they are, integers (not booleans) written in decimal."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise FinetuneDataError(
        f"{path}:{lineno}: field {name!r} must be a string or an integer label, got {value!r}; fix the record"
    )


def read_classification(
    path: str | Path, text_field: str = "text", label_field: str = "label"
) -> list[ClassificationExample]:
    """(text, label) examples from a `.jsonl` file (one object a line) or a `.csv` file (a header row
    naming the fields)."""
    path = Path(path)
    if path.is_dir():
        examples = list(_read_classification_dataset(path, text_field, label_field))
    elif path.suffix == ".jsonl":
        examples = list(_read_classification_jsonl(path, text_field, label_field))
    elif path.suffix == ".csv":
        examples = list(_read_classification_csv(path, text_field, label_field))
    else:
        raise FinetuneDataError(
            f"{path}: unknown classification format {path.suffix!r}; use a .jsonl or .csv file"
        )
    if not examples:
        raise _no_examples(path, "examples")
    return examples


def _read_classification_dataset(
    path: Path, text_field: str, label_field: str
) -> Iterator[ClassificationExample]:
    ds = _load_split(path)
    missing = [c for c in (text_field, label_field) if c not in ds.column_names]
    if missing:
        raise FinetuneDataError(
            f"{path}: no column {missing[0]!r} (have {ds.column_names}); name the text and label fields"
        )
    names = _class_names(ds, label_field)
    for row, record in enumerate(ds.select_columns([text_field, label_field]), 1):
        text, label = record[text_field], record[label_field]
        if not isinstance(text, str):
            raise FinetuneDataError(f"{path}:row {row}: {text_field!r} must be a string")
        if names is not None and isinstance(label, int):
            label = names[label]
        yield ClassificationExample(text, _label(path, row, label, label_field))


def _read_classification_jsonl(
    path: Path, text_field: str, label_field: str
) -> Iterator[ClassificationExample]:
    for lineno, record in _json_records(path):
        text = _field(path, lineno, record, text_field)
        if not isinstance(text, str):
            raise FinetuneDataError(
                f"{path}:{lineno}: field {text_field!r} must be a string, got {type(text).__name__}; "
                "fix the record or name the text field"
            )
        label = _label(path, lineno, _field(path, lineno, record, label_field), label_field)
        yield ClassificationExample(text, label)


def _read_classification_csv(
    path: Path, text_field: str, label_field: str
) -> Iterator[ClassificationExample]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
            for name in (text_field, label_field):
                if name not in header:
                    raise FinetuneDataError(
                        f"{path}:1: header has no column {name!r} (columns: {header}); "
                        "add it or name the right column"
                    )
            for row in reader:
                text, label = row[text_field], row[label_field]
                if text is None or label is None:
                    raise FinetuneDataError(
                        f"{path}:{reader.line_num}: row has fewer columns than the header {header}; "
                        f"fill in {text_field!r} and {label_field!r}"
                    )
                yield ClassificationExample(text, label)
        except UnicodeDecodeError as e:
            raise FinetuneDataError(
                f"{path}:{reader.line_num + 1}: invalid UTF-8 at byte {e.start}; re-encode the file as UTF-8"
            ) from None
        except csv.Error as e:
            raise FinetuneDataError(
                f"{path}:{reader.line_num}: malformed CSV ({e}); fix the quoting"
            ) from None


def _span(path: Path, lineno: int, value: Any, name: str, text: str) -> tuple[int, int]:
    """A valid [start, end) span of `text`: two integers with 0 <= start < end <= len(text)."""
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise FinetuneDataError(
            f"{path}:{lineno}: {name} must be [start, end] (two integers), got {value!r}; fix the record"
        )
    start, end = value
    if not 0 <= start < end <= len(text):
        raise FinetuneDataError(
            f"{path}:{lineno}: {name} span [{start}, {end}) is empty or outside the text "
            f"(length {len(text)}); spans are character offsets [start, end) with start < end"
        )
    return start, end


def read_relations(path: str | Path) -> list[RelationExample]:
    """Relation examples from a `.jsonl` file with {"text", "e1": [start, end], "e2": [start, end],
    "label"} a line; the two spans must be non-empty, inside the text and disjoint."""
    path = Path(path)
    examples = []
    for lineno, record in _json_records(path):
        text = _field(path, lineno, record, "text")
        if not isinstance(text, str):
            raise FinetuneDataError(
                f"{path}:{lineno}: field 'text' must be a string, got {type(text).__name__}; fix the record"
            )
        e1 = _span(path, lineno, _field(path, lineno, record, "e1"), "e1", text)
        e2 = _span(path, lineno, _field(path, lineno, record, "e2"), "e2", text)
        if e1[0] < e2[1] and e2[0] < e1[1]:
            raise FinetuneDataError(
                f"{path}:{lineno}: e1 {list(e1)} and e2 {list(e2)} overlap; the two mentions must be disjoint"
            )
        label = _label(path, lineno, _field(path, lineno, record, "label"), "label")
        examples.append(RelationExample(text, e1, e2, label))
    if not examples:
        raise _no_examples(path, "examples")
    return examples


def label_vocab(labels: Iterable[str]) -> list[str]:
    """The distinct labels sorted, except that "O" (the NER outside tag), when present, comes first."""
    distinct = set(labels)
    rest = sorted(distinct - {"O"})
    return ["O", *rest] if "O" in distinct else rest
