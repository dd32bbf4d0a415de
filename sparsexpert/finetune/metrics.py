"""Evaluation metrics for fine-tuning: entity-level NER scores (the numbers of seqeval's default,
conlleval-compatible mode, computed without seqeval), classification accuracy and macro F1, and
TACRED-style relation scores that ignore the negative class.

Wherever a ratio is undefined (nothing predicted, nothing in the gold data) it is 0.0, as in
seqeval's and scikit-learn's default `zero_division`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

AVERAGES = ("micro avg", "macro avg", "weighted avg")


def _split_tag(tag: str) -> tuple[str, str]:
    """(prefix, type) of a tag as seqeval reads it: "B-PER" -> ("B", "PER"), "O" -> ("O", "_")."""
    if not tag:
        raise ValueError("empty tag; tags look like 'O', 'B-PER', 'I-PER', 'E-PER' or 'S-PER'")
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """Whether a chunk ended between the previous token and this one."""
    return (
        prev_tag in ("E", "S")
        or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
        or (prev_tag not in ("O", ".") and prev_type != type_)
    )


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """Whether a chunk starts at this token."""
    return (
        tag in ("B", "S")
        or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
        or (tag not in ("O", ".") and prev_type != type_)
    )


def get_entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """The chunks (type, start, end inclusive) of a tag sequence, exactly as seqeval's default mode
    finds them: a chunk starts at B-X or S-X, at I-X or E-X after O, E or S, or wherever the type
    changes; it ends after E or S, before B, S or O, or where the type changes."""
    chunks = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, chunk in enumerate([*tags, "O"]):
        tag, type_ = _split_tag(chunk)
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


@dataclass
class _Counts:
    tp: int = 0
    pred: int = 0
    true: int = 0


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    return _ratio(2 * precision * recall, precision + recall)


def _row(precision: float, recall: float, f1: float, support: int) -> dict[str, float | int]:
    return {"precision": precision, "recall": recall, "f1-score": f1, "support": support}


def _check_lengths(y_true: Sequence, y_pred: Sequence) -> None:
    if len(y_true) != len(y_pred):
        raise ValueError(
            f"{len(y_true)} gold items but {len(y_pred)} predictions; give one prediction per item"
        )


def _entity_counts(y_true: list[list[str]], y_pred: list[list[str]]) -> dict[str, _Counts]:
    """Per entity type: true positives, predicted and gold chunks, over all sentences."""
    _check_lengths(y_true, y_pred)
    for n, (gold, pred) in enumerate(zip(y_true, y_pred)):
        if len(gold) != len(pred):
            raise ValueError(
                f"sentence {n}: {len(gold)} gold tags but {len(pred)} predicted; give one tag per token"
            )
    true_chunks: dict[str, set[tuple[int, int]]] = defaultdict(set)
    pred_chunks: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for sequences, chunks in ((y_true, true_chunks), (y_pred, pred_chunks)):
        flat = [tag for sentence in sequences for tag in [*sentence, "O"]]
        for type_, start, end in get_entities(flat):
            chunks[type_].add((start, end))
    return {
        type_: _Counts(
            len(true_chunks[type_] & pred_chunks[type_]), len(pred_chunks[type_]), len(true_chunks[type_])
        )
        for type_ in sorted(true_chunks.keys() | pred_chunks.keys())
    }


def entity_report(y_true: list[list[str]], y_pred: list[list[str]]) -> dict[str, dict[str, float | int]]:
    """Entity-level precision, recall, F1 and support (gold chunks) per type, with "micro avg", "macro avg"
    and "weighted avg" rows: the keys and numbers of seqeval's `classification_report(y_true, y_pred,
    output_dict=True)` in its default mode. A chunk counts as correct when its type, start and end all
    match. The one difference: with no chunk at all, gold or predicted, "macro avg" is 0.0, not NaN."""
    counts = _entity_counts(y_true, y_pred)
    report: dict[str, dict[str, float | int]] = {}
    for type_, c in counts.items():
        precision, recall = _ratio(c.tp, c.pred), _ratio(c.tp, c.true)
        report[type_] = _row(precision, recall, _f1(precision, recall), c.true)
    rows = list(report.values())
    tp, pred, true = (sum(getattr(c, name) for c in counts.values()) for name in ("tp", "pred", "true"))
    precision, recall = _ratio(tp, pred), _ratio(tp, true)
    report["micro avg"] = _row(precision, recall, _f1(precision, recall), true)
    keys = ("precision", "recall", "f1-score")
    p, r, f = (_ratio(sum(row[key] for row in rows), len(rows)) for key in keys)
    report["macro avg"] = _row(p, r, f, true)
    p, r, f = (_ratio(sum(row[key] * row["support"] for row in rows), true) for key in keys)
    report["weighted avg"] = _row(p, r, f, true)
    return report


def format_report(report: dict[str, dict[str, float | int]], digits: int = 2) -> str:
    """`report` as a text table laid out like seqeval's `classification_report` (with its default of two
    decimals): one row per type, a blank line, then the average rows."""
    names = [name for name in report if name not in AVERAGES]
    width = max([len(name) for name in names] + [len("weighted avg"), digits])
    headers = ("precision", "recall", "f1-score", "support")
    row_fmt = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}"

    def line(name: str) -> str:
        row = report[name]
        values = (row["precision"], row["recall"], row["f1-score"], row["support"])
        return row_fmt.format(name, *values, width=width, digits=digits)

    header = ("{:>{width}s} " + " {:>9}" * len(headers)).format("", *headers, width=width)
    body = [line(name) for name in names] + [""] + [line(name) for name in AVERAGES if name in report] + [""]
    return header + "\n\n" + "\n".join(body)


def classification_scores(y_true: list[str], y_pred: list[str]) -> dict[str, float]:
    """Accuracy, and F1 averaged with equal weight over every label in y_true or y_pred (a label never
    predicted, or never gold, has F1 0)."""
    _check_lengths(y_true, y_pred)
    if not y_true:
        raise ValueError("no examples to score")
    counts: dict[str, _Counts] = defaultdict(_Counts)
    for gold, pred in zip(y_true, y_pred):
        counts[gold].true += 1
        counts[pred].pred += 1
        counts[gold].tp += gold == pred
    f1s = [_f1(_ratio(c.tp, c.pred), _ratio(c.tp, c.true)) for c in counts.values()]
    accuracy = sum(c.tp for c in counts.values()) / len(y_true)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s)}


def relation_scores(y_true: list[str], y_pred: list[str], negative: str = "no_relation") -> dict[str, float]:
    """TACRED-style micro precision, recall and F1 over the positive relations, and accuracy over all
    examples: a prediction other than `negative` is a guess, a guess equal to the gold label is correct,
    precision = correct / guesses and recall = correct / gold labels other than `negative`."""
    _check_lengths(y_true, y_pred)
    if not y_true:
        raise ValueError("no examples to score")
    guessed = sum(pred != negative for pred in y_pred)
    gold = sum(label != negative for label in y_true)
    correct = sum(pred != negative and pred == label for label, pred in zip(y_true, y_pred))
    precision, recall = _ratio(correct, guessed), _ratio(correct, gold)
    accuracy = sum(label == pred for label, pred in zip(y_true, y_pred)) / len(y_true)
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall), "accuracy": accuracy}
