"""Task examples to token tensors, and the deterministic order in which ranks read them.

NER: each word is encoded on its own (SentencePiece pieces never cross a space). Every piece is trained
(Hugging Face's `label_all_tokens`): the first carries the word's tag, the others its inside form (B-X and
I-X give I-X, O gives O). The model's prediction is the entities of its per-piece tags, chunked as seqeval
chunks words; a word's predicted tag is that prediction seen word by word (`ner_decode`), so a pipeline
that labels every piece (transformers' `aggregation_strategy="simple"`) finds the same entities. Relation: the sentence with
`[E1] ... [/E1]` and `[E2] ... [/E2]` around the two mentions; the head pools the states at the first
piece of each opening marker. Every example starts with BOS. Longer examples are cut at max_len
(counted); a relation example whose marker would be cut is dropped (counted).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.tokenizer import CachedEncoder
from sparsexpert.finetune.config import TaskConfig
from sparsexpert.finetune.metrics import get_entities
from sparsexpert.finetune.readers import label_vocab, read_classification, read_ner, read_relations
from sparsexpert.model.transformer import IGNORE_INDEX

MARKERS = ("[E1]", "[/E1]", "[E2]", "[/E2]")


@dataclass
class Encoded:
    """One split of one task, encoded."""

    ids: list[np.ndarray]
    labels: list[np.ndarray | int]
    """Per-token label ids (ner) or one label id."""
    markers: list[tuple[int, int]] = field(default_factory=list)
    """Relation: positions of [E1] and [E2]."""
    words: list[list[str]] = field(default_factory=list)
    """NER: the words, for the predictions file."""
    tags: list[list[str]] = field(default_factory=list)
    """NER: every word's gold tag (also of words cut by max_len, so scores stay honest)."""
    first_piece: list[np.ndarray] = field(default_factory=list)
    """NER: token position of each word's first piece (-1: the word was cut)."""
    piece_end: list[np.ndarray] = field(default_factory=list)
    """NER: token position after each word's last piece (-1: the word was cut)."""
    char_bounds: list[np.ndarray] = field(default_factory=list)
    """NER: (tokens, 2) character [begin, end) of every token in the words joined by single spaces
    (the BOS row is (0, 0))."""
    counts: Counter = field(default_factory=Counter)


def read_task(task: TaskConfig, split: str) -> list:
    path = getattr(task, split)
    if task.kind == "ner":
        return read_ner(path)
    if task.kind == "classification":
        return read_classification(path, task.text_field, task.label_field)
    return read_relations(path)


def task_labels(task: TaskConfig, train: list) -> list[str]:
    if task.kind == "ner":  # every type seen in training, in both its B- and I- form
        types = sorted({t[2:] for ex in train for t in ex.tags if t != "O"})
        return ["O", *(f"{p}-{x}" for x in types for p in "BI")]
    labels = label_vocab(ex.label for ex in train)
    if task.kind == "relation" and task.negative_label not in labels:
        labels = [task.negative_label, *labels]
    return labels


def encode(
    task: TaskConfig, examples: list, labels: list[str], tok, bos: int, max_len: int, path: str
) -> Encoded:
    enc = CachedEncoder(tok)
    index = {lab: i for i, lab in enumerate(labels)}
    out = Encoded([], [])

    def label_id(lab: str, n: int) -> int:
        if lab not in index and task.kind == "ner":  # a type training never saw: scored, not trained on
            out.counts["tags_of_unseen_types"] += 1
            return IGNORE_INDEX
        if lab not in index:
            raise ValueError(
                f"{path}: example {n + 1} has label {lab!r}, which the training file never uses; "
                f"known labels: {', '.join(labels)}"
            )
        return index[lab]

    bounds: dict[str, np.ndarray] = {}

    def word_bounds(word: str) -> np.ndarray:
        """(pieces, 2) character bounds of each piece of `word` encoded alone."""
        if word not in bounds:
            ids = enc(word)
            bounds[word] = np.stack(tok.char_bounds(word, ids), 1) if len(ids) else np.zeros((0, 2), np.int64)
        return bounds[word]

    for n, ex in enumerate(examples):
        if task.kind == "ner":
            pieces = [enc(w) for w in ex.tokens]
            ids, tags, first, end = [bos], [IGNORE_INDEX], [], []
            where, at = [np.zeros((1, 2), np.int64)], 0
            for word, w, tag in zip(ex.tokens, pieces, ex.tags):
                start, at = at, at + len(word) + 1
                if len(ids) + max(len(w), 1) > max_len:
                    first.append(-1)
                    end.append(-1)
                    continue
                first.append(len(ids) if len(w) else -1)
                end.append(len(ids) + len(w) if len(w) else -1)
                ids += list(w)
                head = label_id(tag, n)
                rest = IGNORE_INDEX if head == IGNORE_INDEX else index["O" if tag == "O" else f"I-{tag[2:]}"]
                tags += [head] + [rest] * (len(w) - 1)
                where.append(np.clip(word_bounds(word), 0, len(word)) + start)
            if -1 in first:
                out.counts["sentences_cut"] += 1
            out.ids.append(np.asarray(ids, np.int64))
            out.labels.append(np.asarray(tags, np.int64))
            out.words.append(list(ex.tokens))
            out.tags.append(list(ex.tags))
            out.first_piece.append(np.asarray(first, np.int64))
            out.piece_end.append(np.asarray(end, np.int64))
            out.char_bounds.append(np.concatenate(where))
        elif task.kind == "classification":
            ids = np.r_[bos, enc(ex.text)][:max_len]
            out.counts["texts_cut"] += int(len(enc(ex.text)) + 1 > max_len)
            out.ids.append(ids.astype(np.int64))
            out.labels.append(label_id(ex.label, n))
        else:
            (s1, e1), (s2, e2) = ex.e1, ex.e2
            t = ex.text
            order = sorted([(s1, e1, "[E1]", "[/E1]"), (s2, e2, "[E2]", "[/E2]")])
            segments, pos, marks = [], 0, {}
            for s, e, open_m, close_m in order:
                segments += [(t[pos:s], None), (open_m, open_m), (t[s:e], None), (close_m, None)]
                pos = e
            segments.append((t[pos:], None))
            ids = [bos]
            for text, mark in segments:
                if mark:
                    marks[mark] = len(ids)
                ids += list(enc(text))
            if max(marks.values()) >= max_len:
                out.counts["dropped_marker_cut"] += 1
                continue
            out.counts["texts_cut"] += int(len(ids) > max_len)
            out.ids.append(np.asarray(ids[:max_len], np.int64))
            out.labels.append(label_id(ex.label, n))
            out.markers.append((marks["[E1]"], marks["[E2]"]))
    return out


@dataclass
class NerPrediction:
    """One sentence's NER prediction."""

    tags: list[str]
    """Each word's tag as the entities give it: B- where an entity starts in the word, I- where one goes
    on through it, O elsewhere (also for a word cut by max_len)."""
    entities: list[dict[str, Any]]
    """The entities of the per-piece tags, chunked over the pieces as seqeval chunks words:
    {"type", "start", "end", "text"}, character offsets in the words joined by single spaces."""
    inside_word: int = 0
    """Entities that start or end inside a word (their word tags cover the whole word)."""
    empty: int = 0
    """Chunks of pieces that cover no character (a bare word-start mark "▁"): not entities."""


def ner_decode(data: Encoded, i: int, pred: np.ndarray, labels: list[str]) -> NerPrediction:
    """Sentence i's prediction from its per-token label ids `pred` (BOS first, as in data.ids[i])."""
    first, end, bounds = data.first_piece[i], data.piece_end[i], data.char_bounds[i]
    word_of = np.full(len(data.ids[i]), -1)
    for w, (a, b) in enumerate(zip(first, end)):
        if a >= 0:
            word_of[a:b] = w
    text = " ".join(data.words[i])
    out = NerPrediction(["O"] * len(first), [])
    for type_, a, b in get_entities([labels[p] for p in pred[1 : len(data.ids[i])]]):
        a, b = a + 1, b + 1  # token positions, BOS being 0
        start, stop = int(bounds[a, 0]), int(bounds[b, 1])
        if start == stop:  # only a bare word-start mark "▁": no character named
            out.empty += 1
            continue
        out.entities.append({"type": type_, "start": start, "end": stop, "text": text[start:stop]})
        touched = sorted({int(w) for w in word_of[a : b + 1] if w >= 0})
        out.inside_word += int(first[touched[0]] != a or end[touched[-1]] != b + 1)
        free = [w for w in touched if out.tags[w] == "O"]
        for k, w in enumerate(free):
            out.tags[w] = f"{'I' if k else 'B'}-{type_}"
    return out


def collate(data: Encoded, kind: str, idx: np.ndarray, pad_id: int, causal: bool) -> dict[str, Any]:
    """A padded batch of examples idx: model keyword arguments (without the task)."""
    lengths = torch.tensor([len(data.ids[i]) for i in idx])
    S = int(lengths.max())
    x = torch.full((len(idx), S), pad_id, dtype=torch.long)
    for b, i in enumerate(idx):
        x[b, : lengths[b]] = torch.from_numpy(data.ids[i])
    batch: dict[str, Any] = {"input_ids": x, "lengths": lengths}
    if kind == "ner":
        y = torch.full((len(idx), S), IGNORE_INDEX, dtype=torch.long)
        for b, i in enumerate(idx):
            y[b, : lengths[b]] = torch.from_numpy(data.labels[i])
        batch["labels"] = y
    else:
        batch["labels"] = torch.tensor([data.labels[i] for i in idx], dtype=torch.long)
    if kind == "relation":
        batch["markers"] = torch.tensor([data.markers[i] for i in idx], dtype=torch.long)
    if not causal:  # padding is after the text: a bidirectional model must not attend to it
        keep = torch.arange(S)[None, :] < lengths[:, None]
        batch["attn_mask"] = keep[:, None, :].expand(len(idx), S, S)
    return batch


class TaskSchedule:
    """Which task each optimizer step trains, and which examples rank `rank` reads at accumulation
    step m: per task, an endless stream of per-epoch permutations seeded by (seed, task, epoch);
    the step's global batch is cut into micro-batches j = m * dp + rank, as in pretraining."""

    def __init__(
        self,
        sizes: list[int],
        micro: int,
        grad_accum: int,
        dp: int,
        rank: int,
        seed: int,
        sampling: str,
        temperature: float,
    ):
        self.sizes, self.micro, self.grad_accum, self.dp, self.rank, self.seed = (
            sizes,
            micro,
            grad_accum,
            dp,
            rank,
            seed,
        )
        p = np.asarray(sizes, np.float64) ** (1.0 / temperature if sampling == "temperature" else 1.0)
        self.probs = p / p.sum()
        self._tasks: list[int] = []
        self._before: list[int] = []
        self._counts = [0] * len(sizes)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def task_of(self, step: int) -> int:
        """The task of a step: drawn from a generator seeded by (seed, step)."""
        while len(self._tasks) <= step:
            rng = np.random.default_rng([self.seed, 99, len(self._tasks)])
            task = int(rng.choice(len(self.sizes), p=self.probs)) if len(self.sizes) > 1 else 0
            self._before.append(self._counts[task])  # global batches this task had before this step
            self._counts[task] += 1
            self._tasks.append(task)
        return self._tasks[step]

    def examples(self, step: int, m: int) -> tuple[int, np.ndarray]:
        task = self.task_of(step)
        k = self._before[step]
        n, g = self.sizes[task], self.micro * self.grad_accum * self.dp
        start = k * g + (m * self.dp + self.rank) * self.micro
        pos = np.arange(start, start + self.micro)
        epochs, offsets = np.divmod(pos, n)
        out = np.empty(self.micro, np.int64)
        for e in np.unique(epochs):
            key = (task, int(e))
            if key not in self._perms:
                self._perms[key] = np.random.default_rng([self.seed, task, int(e)]).permutation(n)
            out[epochs == e] = self._perms[key][offsets[epochs == e]]
        return task, out


def load_tokenizer_for(path: str | Path):
    from data_prep.tokenizer import find_tokenizer, load_tokenizer

    p = Path(path)
    if p.is_dir() and not (p / "tokenizer.json").is_file():  # a Hugging Face folder is one already
        found = find_tokenizer(p)
        if found is None:
            raise FileNotFoundError(f"{p}: no tokenizer.model or tokenizer/ folder in it")
        p = found
    return load_tokenizer(p)
