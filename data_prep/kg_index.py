"""A compact knowledge-graph index, built once per KG and shared by every process that reads it.

The KG files are read once, in one pass, into integer arrays; the index is written as NumPy files
(no pickle) in a folder beside the dataset, `<output>.kgindex/`, keyed by a hash of its inputs, and
reused by every later run, stage and worker with the same inputs. Readers memory-map it: every
worker and every machine on a shared filesystem reads the same pages, so a worker's memory does not
grow with the KG (the operating system holds one copy in its page cache).

What it holds (entity ids are ranks of the entity names in sorted order, over the KG's entities and
those the alias file names, so integer order is name order):

    entities.utf8 / entities_off.npy  the entity names, sorted (UTF-8 bytes, byte offsets: see StringTable)
    surfaces.utf8 / surfaces_off.npy  each entity's first alias in the alias file ("" if none)
    in_kg.npy                         bool: the entity is the head or tail of a KG triple kept
    relations.txt                     the relation names of the triples kept, sorted
    triples.npy                       int64 [n, 3] head, relation, tail ids: the distinct triples whose
                                      entities have an alias, sorted by (head, relation, tail) name
    pair_key.npy, pair_triple.npy     head * n_entities + tail for each triple, sorted; the triple of each
    alias_*.npy, alias.utf8           the alias matcher's keys (see AliasMatcher); alias_starts.npy the
                                      buckets of their first three characters, where a match can start
    meta.json                         format, the inputs' hash, counts, each file's size and xxh3-128 (checked
                                      when the index is reused; a damaged one is built again); written last

The alias matcher finds what an Aho-Corasick automaton over the aliases finds (the longest match at the
leftmost start, word-bounded, non-overlapping; tests/test_kg_index.py checks it against pyahocorasick)
without holding the automaton in every process: each alias is a 64-bit polynomial hash of its code
points, grouped by length; a text's substrings that start and end on word boundaries are hashed with
NumPy (prefix sums) and looked up by binary search; every hash hit is checked against the alias text,
so a hash collision costs a comparison, never a wrong mention.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.arrays import SortedKeys, native, search, sorted_unique
from data_prep.kg import Mention, Triple, fold_case, iter_aliases, iter_triples
from data_prep.output import file_digest, fsync_dir, write_durable
from data_prep.readers import DataError

INDEX_FORMAT = "sparsexpert-kgindex/1"
META = "meta.json"

# Polynomial hashing modulo 2**64 (NumPy's unsigned arithmetic wraps): hash(s) = sum (c_j + 1) B^(n-1-j).
_B = 0x9E3779B97F4A7C15  # odd, so invertible modulo 2**64
_B_INV = pow(_B, -1, 2**64)
SEP = "\0"  # between the texts matched in one pass; refused in aliases


_POWERS: list[np.ndarray] = [np.ones(1, np.uint64), np.ones(1, np.uint64)]


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """B^k and B^-k modulo 2**64 for k < n (one table per process, grown by doubling)."""
    if len(_POWERS[0]) < n:
        size = 1 << max(n - 1, 1).bit_length()
        p = np.full(size, _B, dtype=np.uint64)
        q = np.full(size, _B_INV, dtype=np.uint64)
        p[0] = q[0] = 1
        with np.errstate(over="ignore"):
            _POWERS[:] = [np.cumprod(p, dtype=np.uint64), np.cumprod(q, dtype=np.uint64)]
    return _POWERS[0], _POWERS[1]


def _prefix(cp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For code points cp: G (n + 1 prefix sums of (c_j + 1) B^-j, G[0] = 0) and the powers B^k."""
    n = len(cp)
    p, q = _powers(n + 1)
    g = np.zeros(n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        np.cumsum((cp.astype(np.uint64) + np.uint64(1)) * q[:n], dtype=np.uint64, out=g[1:])
    return g, p


def _hashes(g: np.ndarray, p: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """hash of each [start, end) (end > start), from _prefix."""
    with np.errstate(over="ignore"):
        return p[end - 1] * (g[end] - g[start])


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


_TABLES: dict[str, np.ndarray] = {}  # int8 per code point: the predicate's answer, -1 where not asked yet


def char_class(cp: np.ndarray, predicate: str) -> np.ndarray:
    """str.<predicate>() ("isalnum", "isspace") of each code point, from a per-process table filled for
    the code points met (a text holds few distinct ones: filling all 1.1 M took 0.25 s at every worker's
    start)."""
    table = _TABLES.get(predicate)
    if table is None:
        table = _TABLES[predicate] = np.full(0x110000, -1, dtype=np.int8)
    got = table[cp]
    if (got < 0).any():
        for c in np.unique(cp[got < 0]).tolist():
            table[c] = getattr(chr(c), predicate)()
        got = table[cp]
    return got.astype(bool)


def text_classes(text: str) -> np.ndarray:
    """uint8 per character of text: 1 where str.isalnum(), 2 where str.isspace() (the compiled scan's one
    pass; char_class's tables where it is not built)."""
    compiled = native()
    if compiled is not None:
        return np.frombuffer(compiled.classes(text), np.uint8)
    cp = _code_points(text)
    return char_class(cp, "isalnum").astype(np.uint8) | char_class(cp, "isspace").astype(np.uint8) << 1


def word_boundaries(text: str, cp: np.ndarray | None = None) -> np.ndarray:
    """bool [len(text) + 1]: i is a boundary unless text[i - 1] and text[i] are both alphanumeric."""
    alnum = char_class(_code_points(text) if cp is None else cp, "isalnum")
    out = np.ones(len(alnum) + 1, dtype=bool)
    out[1:-1] = ~(alnum[:-1] & alnum[1:])
    return out


class StringTable:
    """Strings in one memory-mapped file, their UTF-8 bytes one after the other, with their byte
    offsets (n + 1): Arrow's large_string layout, so pyarrow reads the table without a copy."""

    def __init__(self, folder: Path, name: str):
        data = folder / f"{name}.utf8"
        # plain ndarray views of the mapped files: numpy.memmap's indexing costs a microsecond a call
        mapped = np.memmap(data, dtype=np.uint8, mode="r") if data.stat().st_size else np.zeros(0, np.uint8)
        self.blob = np.asarray(mapped)
        self.off = _mapped(folder / f"{name}_off.npy")

    @staticmethod
    def write(folder: Path, name: str, strings) -> None:
        """From a list of str or a pyarrow string array."""
        import pyarrow as pa

        arr = pa.array(strings, pa.large_string()) if isinstance(strings, list) else strings
        arr = arr.cast(pa.large_string())
        n = len(arr)
        off = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
        data = arr.buffers()[2]
        with open(folder / f"{name}.utf8", "wb") as f:
            if n and data is not None:
                f.write(memoryview(data)[off[0] : off[-1]])
        np.save(folder / f"{name}_off.npy", off - off[0])

    def __len__(self) -> int:
        return len(self.off) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[self.off[i] : self.off[i + 1]].tobytes().decode("utf-8")

    def arrow(self):
        """The table as a pyarrow large_string array over the memory-mapped bytes."""
        import pyarrow as pa

        return pa.LargeStringArray.from_buffers(
            len(self), pa.py_buffer(np.ascontiguousarray(self.off)), pa.py_buffer(self.blob)
        )

    def to_list(self) -> list[str]:
        return self.arrow().to_pylist()

    def find(self, s: str) -> int:
        """The position of s in a sorted table, or -1 (UTF-8 byte order is code point order)."""
        key = s.encode("utf-8")
        lo, hi = 0, len(self)
        while lo < hi:
            mid = (lo + hi) // 2
            if bytes(self.blob[self.off[mid] : self.off[mid + 1]]) < key:
                lo = mid + 1
            else:
                hi = mid
        return lo if lo < len(self) and bytes(self.blob[self.off[lo] : self.off[lo + 1]]) == key else -1


class AliasMatcher:
    """Word-bounded, leftmost-longest alias matching over the index's alias keys (see the module doc)."""

    def __init__(self, folder: Path, case: str, names: StringTable, ids: dict[str, int] | None = None):
        self.folder, self.case, self.names = folder, case, names
        # name -> id of the entities found (shared with KGIndex.entity_id's cache), and id -> name
        self.ids = ids if ids is not None else {}
        self._names: dict[int, str] = {}
        self.lengths = np.load(folder / "alias_lengths.npy")  # distinct key lengths, ascending
        # where a key can start: a bucket of its first one, two or three characters (see _write_aliases)
        self.starts = _mapped(folder / "alias_starts.npy")
        self.bounds = np.load(folder / "alias_bounds.npy")  # keys of lengths[k]: [bounds[k], bounds[k + 1])
        self.hash = _mapped(folder / "alias_hash.npy")  # sorted within each length
        self._sorted_hash = SortedKeys(self.hash)  # the compiled scan's lookups (a sample in the cache)
        self.entity = _mapped(folder / "alias_entity.npy")
        self.keys = StringTable(folder, "alias")
        self._filter: np.ndarray | None = None
        self._shift = np.uint64(0)
        self._start_bits: np.ndarray | None = None
        self._lead = np.zeros(32, np.uint8)
        # the compiled scan's table of key lengths: length -> its position in lengths, -1 for no key's
        self._length_key = np.full(int(self.lengths[-1]) + 1 if len(self.lengths) else 1, -1, np.int64)
        self._length_key[self.lengths] = np.arange(len(self.lengths))

    def find_ids(self, text: str) -> list[tuple[int, int, int]]:
        """(start, end, entity id) of every match, sorted by start."""
        return self.find_ids_many([text])[0]

    def find_ids_many(self, texts: list[str]) -> list[list[tuple[int, int, int]]]:
        """find_ids of each text, matched in one pass (match_arrays)."""
        start, end, entity, offsets = self.match_arrays(texts)
        out: list[list[tuple[int, int, int]]] = [[] for _ in texts]
        doc = np.searchsorted(offsets, start, side="right") - 1
        local = start - offsets[doc]
        for d, a, b, e in zip(doc.tolist(), local.tolist(), (end - start + local).tolist(), entity.tolist()):
            out[d].append((a, b, e))
        return out

    def match_arrays(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every match in the texts joined by NUL characters (which no alias holds, so no match crosses
        from one text into the next), leftmost-longest and non-overlapping, sorted by start: start and
        end in the joined text, entity id; and each text's offset in it (len(texts) + 1 of them). The
        NumPy work per alias length is paid once for all the texts, not once per text."""
        offsets = np.cumsum([0, *(len(t) + 1 for t in texts)])
        text = SEP.join(texts)
        return (*self.match_joined(texts, text, _code_points(text)), offsets)

    def match_joined(
        self, texts: list[str], text: str, cp: np.ndarray, classes: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """match_arrays of texts already joined (text, its code points cp), without the offsets. classes:
        text_classes(text), if already at hand (the compiled scan reads them)."""
        none = np.zeros(0, np.int64)
        if not len(self.lengths) or not any(texts):
            return none, none, none
        hay = SEP.join(fold_case(t) for t in texts) if self.case == "ignore" else text
        if native() is not None:
            return self._match_native(text, hay, classes)
        n = len(text)
        hay_cp = cp if hay is text else _code_points(hay)
        g, p = _prefix(hay_cp)
        boundary = word_boundaries(text, cp)
        starts = np.flatnonzero(boundary[:n])
        starts = starts[~char_class(cp[starts], "isspace")]  # aliases are stripped: none starts with a space
        # keep the starts whose first one, two or three characters begin some key: a key of one or two
        # characters only where it would end on a word boundary
        padded = np.append(hay_cp, np.zeros(2, np.uint32))  # widened to uint64 where gathered, not whole
        table, nb, lengths = self.starts, len(self.starts), self.lengths.tolist()
        can = np.zeros(len(starts), bool)
        for width in (1, 2, 3):
            if (width < 3 and width not in lengths) or (width == 3 and lengths[-1] < 3):
                continue
            fits = starts + width <= n
            if width < 3:
                fits[fits] = boundary[starts[fits] + width]
            sel = np.flatnonzero(fits)
            at = starts[sel]
            zero = np.zeros(len(at), np.uint64)
            c = [padded[at + i].astype(np.uint64) if i < width else zero for i in range(3)]
            can[sel] |= table[_bucket(c[0], c[1], c[2], zero + np.uint64(width), nb)]
        starts = starts[can]
        # hash hits are checked against the keys' UTF-8 bytes: each character's byte offset in the haystack
        if hay.isascii():
            utf8, byte_at = np.frombuffer(hay.encode("ascii"), np.uint8), None
        else:
            byte_at = np.zeros(n + 1, np.int64)
            np.cumsum(1 + (hay_cp >= 0x80) + (hay_cp >= 0x800) + (hay_cp >= 0x10000), out=byte_at[1:])
            utf8 = np.frombuffer(hay.encode("utf-8", "surrogatepass"), np.uint8)
        found_s, found_k, found_len = [], [], []
        for length, lo, hi in zip(self.lengths.tolist(), self.bounds[:-1].tolist(), self.bounds[1:].tolist()):
            s = starts[: np.searchsorted(starts, n - length, side="right")]
            s = s[boundary[s + length]]
            if not len(s):
                continue
            h = _hashes(g, p, s, s + length)
            maybe = self._may_be_key(h)  # most pieces are no key: one memory access tells
            s, h = s[maybe], h[maybe]
            keys = self.hash[lo:hi]
            j = search(keys, h)
            hit = j < len(keys)
            hit[hit] = keys[j[hit]] == h[hit]
            s, k = s[hit], j[hit] + lo
            b0, b1 = (s, s + length) if byte_at is None else (byte_at[s], byte_at[s + length])
            same = self._same_text(utf8, b0, b1, k)
            for q in np.flatnonzero(~same).tolist():  # equal hashes, another text: a rare collision
                kk, hk, piece = int(k[q]) + 1, self.hash[k[q]], hay[s[q] : s[q] + length]
                while kk < hi and self.hash[kk] == hk:
                    if self.keys[kk] == piece:
                        k[q], same[q] = kk, True
                        break
                    kk += 1
            found_s.append(s[same])
            found_k.append(k[same])
            found_len.append(np.full(int(same.sum()), length, np.int64))
        if not found_s:
            return none, none, none
        start, key, length_ = (np.concatenate(x) for x in (found_s, found_k, found_len))
        order = np.lexsort((-length_, start))  # by start, the longest first
        start, key, length_ = start[order], key[order], length_[order]
        longest = np.ones(len(start), bool)  # at a start, only the longest can be taken
        longest[1:] = start[1:] != start[:-1]
        start, key, end = start[longest], key[longest], start[longest] + length_[longest]
        # leftmost-longest, no overlaps: a match that no earlier one reaches into is taken; where matches
        # overlap, each run of them is walked in order from the last one taken before it
        reach = np.maximum.accumulate(end)
        free = np.ones(len(start), bool)
        free[1:] = start[1:] >= reach[:-1]
        keep = free.copy()
        contested = np.flatnonzero(~free)
        if len(contested):
            head = np.maximum.accumulate(np.where(free, np.arange(len(start)), 0))
            current, taken_until = -1, 0
            for i, hd in zip(contested.tolist(), head[contested].tolist()):
                if hd != current:
                    current, taken_until = hd, int(end[hd])
                if start[i] >= taken_until:
                    keep[i], taken_until = True, int(end[i])
        return start[keep], end[keep], self.entity[key[keep]].astype(np.int64)

    def _match_native(
        self, text: str, hay: str, classes: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """match_joined by the compiled scan (data_prep/_native.c): the same rules, tables and hash, in
        one pass that hashes only where a key can start."""
        compiled = native()
        assert compiled is not None
        if self._filter is None:
            self._may_be_key(np.zeros(0, np.uint64))  # builds the filter
        if self._start_bits is None:  # the starts table as bits: 2 MiB of cache for 16 Mi buckets, not 16
            dtypes = (self.hash.dtype, self.bounds.dtype, self.keys.off.dtype, self.keys.blob.dtype)
            if dtypes != (np.uint64, np.int64, np.int64, np.uint8):  # the compiled scan reads them as such
                raise DataError(
                    f"{self.folder}: the KG index's alias arrays are {dtypes}; remove the folder to build it again"
                )
            self._start_bits = np.packbits(self.starts, bitorder="little")
            # the first UTF-8 byte of every key, as 256 bits: most words of a text start with no key's
            off = self.keys.off
            first = off[:-1][off[1:] > off[:-1]]
            lead = np.zeros(256, bool)
            for b in range(0, len(first), 1 << 20):  # a block at a time, as the filter
                lead[self.keys.blob[first[b : b + (1 << 20)]]] = True
            self._lead = np.packbits(lead, bitorder="little")
        lengths = self.lengths
        widths = (1 in lengths) | (2 in lengths) << 1 | (int(lengths[-1]) >= 3) << 2
        found = np.frombuffer(
            compiled.match(
                text,
                hay,
                text_classes(text) if classes is None else classes,
                self._lead,
                self._start_bits,
                widths,
                self._length_key,
                self.bounds,
                self.hash,
                self._sorted_hash.sample,
                SortedKeys.STRIDE,
                self._filter,
                int(self._shift),
                self.keys.off,
                self.keys.blob,
            ),
            np.int64,
        ).reshape(-1, 3)
        return found[:, 0], found[:, 1], self.entity[found[:, 2]].astype(np.int64)

    def _may_be_key(self, h: np.ndarray) -> np.ndarray:
        """False where hash h is no key's: a bit per value of the hash's top bits, set for the keys'
        (16 to 32 bits a key, a power of two in all, so 3 to 6% of the other hashes pass); built at the first
        call, from the key hashes (2 to 4 bytes of memory a key in each process)."""
        if self._filter is None:
            bits = max(10, int(np.ceil(np.log2(max(len(self.hash), 1) * 16))))
            self._shift = np.uint64(64 - bits)
            self._filter = np.zeros(1 << (bits - 3), np.uint8)
            for lo in range(0, len(self.hash), 1 << 20):  # a block at a time: no copy of every hash at once
                top = (self.hash[lo : lo + (1 << 20)] >> self._shift).astype(np.int64)
                np.bitwise_or.at(self._filter, top >> 3, (1 << (top & 7)).astype(np.uint8))
        top = (h >> self._shift).astype(np.int64)
        return ((self._filter[top >> 3] >> (top & 7)) & 1).astype(bool)

    def _same_text(self, utf8: np.ndarray, b0: np.ndarray, b1: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Whether the haystack's bytes [b0, b1) equal key k's, for each hit, compared at once."""
        k0, k1 = self.keys.off[k], self.keys.off[k + 1]
        size = k1 - k0
        same = (b1 - b0) == size
        idx = np.flatnonzero(same)
        if len(idx):
            lens = size[idx]
            first = np.cumsum(lens) - lens
            within = np.arange(int(lens.sum())) - np.repeat(first, lens)
            differ = (
                utf8[np.repeat(b0[idx], lens) + within] != self.keys.blob[np.repeat(k0[idx], lens) + within]
            )
            same[idx] = np.add.reduceat(differ, first) == 0
        return same

    def find_many(self, texts: list[str]) -> list[list[Mention]]:
        """find of each text, in one pass (find_ids_many)."""
        out = []
        names = self._names
        for found in self.find_ids_many(texts):
            mentions = []
            for s, e, i in found:
                name = names.get(i)
                if name is None:
                    name = names[i] = self.names[i]
                    self.ids[name] = i  # so the pair lookup that follows needs no search by name
                mentions.append(Mention(s, e, name))
            out.append(mentions)
        if len(names) > 1 << 18:  # bounded: the entities met most recently
            names.clear()
            self.ids.clear()
        return out

    def find(self, text: str) -> list[Mention]:
        """As kg.Linker.find: mentions with the entity's name."""
        return self.find_many([text])[0]


def _mapped(path: Path) -> np.ndarray:
    """A .npy file memory-mapped read-only, as a plain ndarray view (numpy.memmap's indexing and
    searchsorted cost microseconds a call)."""
    return np.asarray(np.load(path, mmap_mode="r", allow_pickle=False))


@dataclass(eq=False)
class KGIndex:
    """An opened index (memory-mapped)."""

    folder: Path
    meta: dict
    names: StringTable
    surfaces: StringTable
    in_kg: np.ndarray
    relations: list[str]
    triples: np.ndarray
    pair_key: np.ndarray
    pair_triple: np.ndarray

    @classmethod
    def open(cls, folder: str | Path) -> KGIndex:
        folder = Path(folder)
        meta = json.loads((folder / META).read_text())
        if meta.get("format") != INDEX_FORMAT:
            raise DataError(f"{folder}: KG index format {meta.get('format')!r}, expected {INDEX_FORMAT}")
        return cls(
            folder,
            meta,
            StringTable(folder, "entities"),
            StringTable(folder, "surfaces"),
            _mapped(folder / "in_kg.npy"),
            (folder / "relations.txt").read_text(encoding="utf-8").split("\n")[: meta["relations"]],
            _mapped(folder / "triples.npy"),
            _mapped(folder / "pair_key.npy"),
            _mapped(folder / "pair_triple.npy"),
        )

    @functools.cached_property
    def pair_keys(self) -> SortedKeys:
        """pair_key for lookups (SortedKeys: compiled, with a sample in the cache)."""
        return SortedKeys(self.pair_key)

    @property
    def n_entities(self) -> int:
        return len(self.names)

    def matcher(self) -> AliasMatcher:
        return AliasMatcher(self.folder, self.meta["case"], self.names, self.__dict__.setdefault("_ids", {}))

    def entity_id(self, name: str) -> int:
        """The id of an entity name, or -1 (a binary search over the names; recent answers cached)."""
        cache = self.__dict__.setdefault("_ids", {})
        if name not in cache:
            if len(cache) >= 1 << 18:
                cache.clear()
            cache[name] = self.names.find(name)
        return cache[name]

    def triple(self, i: int) -> Triple:
        h, r, t = self.triples[i].tolist()
        return Triple(self.names[h], self.relations[r], self.names[t])

    def triple_index(self, t: Triple) -> int:
        """The index of a triple, or -1 if the KG does not have it."""
        h, tail = self.entity_id(t.head), self.entity_id(t.tail)
        if h < 0 or tail < 0 or t.relation not in self._relation_ids:
            return -1
        r = self._relation_ids[t.relation]
        for k in self.pair_triples(h, tail).tolist():  # the few triples from h to tail
            if self.triples[k, 1] == r:
                return k
        return -1

    @functools.cached_property
    def _relation_ids(self) -> dict[str, int]:
        return {r: i for i, r in enumerate(self.relations)}

    def pair_triples(self, head: int, tail: int) -> np.ndarray:
        """The indices of the triples from entity `head` to entity `tail`, ascending."""
        key = head * self.n_entities + tail
        lo = int(np.searchsorted(self.pair_key, key, side="left"))
        hi = int(np.searchsorted(self.pair_key, key, side="right"))
        return np.asarray(self.pair_triple[lo:hi])

    def kg_entities(self) -> Iterator[tuple[int, str, str]]:
        """(dataset index, name, first alias) of the KG's entities, in name order."""
        names, surfaces = self.names.to_list(), self.surfaces.to_list()
        for k, i in enumerate(np.flatnonzero(self.in_kg).tolist()):
            yield k, names[i], surfaces[i]

    def write_entities(self, f) -> None:
        """entities.tsv's lines of the KG's entities (index, name, first alias or the name with
        underscores as spaces) into the binary file f, built by pyarrow a block at a time."""
        import pyarrow as pa
        import pyarrow.compute as pc

        keep = pa.array(np.asarray(self.in_kg))
        names, surfaces = self.names.arrow().filter(keep), self.surfaces.arrow().filter(keep)
        surfaces = pc.if_else(pc.equal(surfaces, ""), pc.replace_substring(names, "_", " "), surfaces)
        _write_joined(f, [pa.array(np.arange(len(names))), names, surfaces])

    def write_triples(self, f, hits: np.ndarray) -> None:
        """triples.tsv's lines of the KG's triples (index, head, relation, tail, times attached, "kg")."""
        import pyarrow as pa

        names, rels = self.names.arrow(), pa.array(self.relations, pa.large_string())
        block = 1 << 20
        for b in range(0, len(self.triples), block):
            rows = np.asarray(self.triples[b : b + block])
            _write_joined(
                f,
                [
                    pa.array(np.arange(b, b + len(rows))),
                    names.take(pa.array(rows[:, 0])),
                    rels.take(pa.array(rows[:, 1])),
                    names.take(pa.array(rows[:, 2])),
                    pa.array(hits[b : b + len(rows)]),
                    pa.scalar("kg", pa.large_string()),
                ],
            )


def _write_joined(f, columns: list) -> None:
    """Tab-separated lines of the columns (numbers or strings; a scalar repeats) into the binary file f."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cols = [c if isinstance(c, pa.Scalar) else c.cast(pa.large_string()) for c in columns]
    line = pc.binary_join_element_wise(
        *cols, pa.scalar("\n", pa.large_string()), pa.scalar("\t", pa.large_string())
    )
    # each line ends in a tab and a newline: the separator before the "\n" column, dropped below
    off = np.frombuffer(line.buffers()[1], dtype=np.int64)[line.offset : line.offset + len(line) + 1]
    data = np.frombuffer(line.buffers()[2], dtype=np.uint8)[off[0] : off[-1]]
    keep = np.ones(len(data), dtype=bool)
    keep[off[1:] - off[0] - 2] = False
    f.write(data[keep].tobytes())


class KGEntities:
    """`name in KGEntities(index)`: the entity is the head or tail of a KG triple."""

    def __init__(self, index: KGIndex):
        self.index = index

    def __contains__(self, name: object) -> bool:
        i = self.index.entity_id(name) if isinstance(name, str) else -1
        return i >= 0 and bool(self.index.in_kg[i])


class PairIndex:
    """kg (head name, tail name) -> triple indices, the lookup distant supervision makes."""

    def __init__(self, index: KGIndex):
        self.index = index

    def __bool__(self) -> bool:
        return len(self.index.triples) > 0

    def get_many(self, pairs: list[tuple[str, str]]) -> list[list[int]]:
        """get of each pair, in one binary search over the pair keys for all of them."""
        if not pairs:
            return []
        index = self.index
        ids = np.array([(index.entity_id(a), index.entity_id(b)) for a, b in pairs], dtype=np.int64)
        key = ids[:, 0] * index.n_entities + ids[:, 1]
        lo = np.searchsorted(index.pair_key, key, side="left")
        hi = np.searchsorted(index.pair_key, key, side="right")
        hi[(ids < 0).any(axis=1)] = lo[(ids < 0).any(axis=1)]  # a name the KG does not have: no triple
        found = np.flatnonzero(hi > lo).tolist()
        out: list[list[int]] = [[] for _ in pairs]
        for q in found:
            out[q] = index.pair_triple[lo[q] : hi[q]].tolist()
        return out

    def get(self, pair: tuple[str, str], default=()) -> list[int] | tuple:
        a, b = self.index.entity_id(pair[0]), self.index.entity_id(pair[1])
        if a < 0 or b < 0:
            return default
        found = self.index.pair_triples(a, b)
        return found.tolist() if len(found) else default


def input_key(kg: str, aliases: str | None, case: str, on_error: str) -> str:
    """The hash an index is keyed by: its format, the input files' contents, the options that shape it."""
    h = hashlib.sha256(f"{INDEX_FORMAT}\0{case}\0{on_error}\0".encode())
    for path in (kg, aliases):
        h.update(b"\0")
        if path:
            with open(path, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
    return h.hexdigest()


def index_dir(output: str | Path) -> Path:
    out = Path(output)
    return out.parent / f"{out.name}.kgindex"


def load_or_build(folder: Path, kg: str, aliases: str | None, case: str, on_error: str, log=print) -> KGIndex:
    """The index of these inputs from `folder`, built there first if it is missing or of other inputs."""
    t0 = time.time()
    key = input_key(kg, aliases, case, on_error)
    meta_file = folder / META
    meta = {}
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            meta = {}
    ours = isinstance(meta, dict) and str(meta.get("format", "")).startswith("sparsexpert-kgindex/")
    if ours:
        if meta.get("key") == key and meta.get("format") == INDEX_FORMAT:
            damaged = _damaged(folder, meta)
            if not damaged:
                index = KGIndex.open(folder)
                log(f"data_prep kg index: {_describe(meta)}, reused from {folder} in {time.time() - t0:.1f}s")
                return index
            log(
                f"data_prep kg index: {folder / damaged} does not match its checksum; building the index again"
            )
    elif folder.exists():
        raise DataError(
            f"{folder}: exists but is not a KG index data_prep wrote (no readable {META} of ours); move it "
            "away, data_prep keeps the KG index of --output there"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        meta = build(work, kg, aliases, case, on_error)
        meta["key"] = key
        # every file fsynced while its checksum is taken, then the meta that vouches for them
        meta["files"] = {f.name: _checksum(f, sync=True) for f in sorted(work.iterdir())}
        tmp = work / (META + ".tmp")
        write_durable(tmp, json.dumps(meta, indent=1).encode())
        tmp.rename(work / META)
        old = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.old")
        if folder.exists():  # ours (its meta.json says so): of other inputs, or damaged
            folder.rename(old)
        work.rename(folder)
        fsync_dir(folder.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if work.exists():
            shutil.rmtree(work)
    log(f"data_prep kg index: {_describe(meta)}, built into {folder} in {time.time() - t0:.1f}s")
    return KGIndex.open(folder)


def _checksum(path: Path, sync: bool = False) -> str:
    """A file's size and xxh3-128 (about 10 GB/s: checking a Wikidata5M-sized index costs a fraction of a
    second)."""
    return f"{path.stat().st_size}:{file_digest(path, sync)}"


def _damaged(folder: Path, meta: dict) -> str | None:
    """The first file of the index that is missing or differs from the checksum meta.json records."""
    for name, want in meta.get("files", {}).items():
        if not (folder / name).is_file() or _checksum(folder / name) != want:
            return name
    return None if meta.get("files") else META


def _describe(meta: dict) -> str:
    return (
        f"{meta['kg_entities']:,} entities, {meta['relations']:,} relations, {meta['triples']:,} triples, "
        f"{meta['alias_keys']:,} alias keys"
    )


def _read_columns(path: Path, names: list[str]) -> list | None:
    """The columns of a tab-separated file read by pyarrow (C++, in parallel), or None where the file
    needs the line-by-line reader: a line of another column count, a comment, an empty or padded value,
    invalid UTF-8 (that reader then names the file and line of the problem, or reads what it accepts)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyarrow import csv

    try:
        table = csv.read_csv(
            path,
            read_options=csv.ReadOptions(column_names=names, block_size=1 << 24),
            parse_options=csv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False),
            convert_options=csv.ConvertOptions(column_types=dict.fromkeys(names, pa.large_string())),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError):
        return None
    cols = [table.column(n) for n in names]
    for c in cols:
        if c.null_count or (len(c) and pc.any(pc.equal(pc.utf8_length(c), 0)).as_py()):
            return None
        if len(c) and pc.any(pc.starts_with(c, "#")).as_py() and c is cols[0]:
            return None
    return cols


def _strip_needed(col) -> bool:
    import pyarrow.compute as pc

    return bool(len(col)) and bool(pc.any(pc.not_equal(col, pc.utf8_trim_whitespace(col))).as_py())


def _triple_columns(kg: str):
    """head, relation, tail of every triple in file order, as pyarrow string arrays."""
    import pyarrow as pa

    path = Path(kg)
    if not path.is_file():
        raise DataError(f"{path}: no such knowledge-graph file; check --kg")
    if not path.name.lower().endswith((".nt", ".jsonl", ".json")):
        cols = _read_columns(path, ["h", "r", "t"])
        if cols is not None and len(cols[0]) and not any(_strip_needed(c) for c in cols):
            return [pa.array(c.combine_chunks(), pa.large_string()) for c in cols]
    heads, rels, tails = [], [], []
    for h, r, t in iter_triples(path):  # names the file and line of a bad one
        heads.append(h)
        rels.append(r)
        tails.append(t)
    return [pa.array(x, pa.large_string()) for x in (heads, rels, tails)]


def _alias_columns(aliases: str):
    """entity, surface form of every alias line in file order (surface forms stripped)."""
    import pyarrow as pa

    path = Path(aliases)
    if not path.is_file():
        raise DataError(f"{path}: no such alias file; check --aliases")
    cols = (
        None if path.name.lower().endswith((".jsonl", ".json")) else _read_columns(path, ["entity", "alias"])
    )
    if cols is not None and not _strip_needed(cols[1]):
        return [pa.array(c.combine_chunks(), pa.large_string()) for c in cols]
    owners, forms = [], []
    for entity, form in iter_aliases(path):  # names the file and line of a bad one
        owners.append(entity)
        forms.append(form)
    return [pa.array(owners, pa.large_string()), pa.array(forms, pa.large_string())]


def _ids(values, vocabulary) -> np.ndarray:
    """The position of each value in the sorted vocabulary (every value is in it)."""
    import pyarrow.compute as pc

    return pc.index_in(values, value_set=vocabulary).to_numpy(zero_copy_only=False).astype(np.int64)


def build(folder: Path, kg: str, aliases: str | None, case: str, on_error: str) -> dict:
    """Read the KG and the aliases (one pass each, parsed by pyarrow) and write the index into `folder`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    heads, rels, tails = _triple_columns(kg)
    if aliases is None:  # entity names, underscores as spaces
        kg_names = pc.unique(pa.concat_arrays([heads, tails]))
        alias_owner, alias_form = kg_names, pc.replace_substring(kg_names, "_", " ")
    else:
        alias_owner, alias_form = _alias_columns(aliases)
    vocab = pc.unique(pa.concat_arrays([heads, tails, alias_owner]))
    vocab = vocab.take(pc.sort_indices(vocab))  # byte order of UTF-8 is code point order: Python's str order
    if pc.any(pc.match_substring(vocab, "\n")).as_py():
        raise DataError(f"{kg}: an entity name holds a line break; entities.tsv cannot hold it")
    relations = pc.unique(rels)
    relations = relations.take(pc.sort_indices(relations))
    h, r, t = _ids(heads, vocab), _ids(rels, relations), _ids(tails, vocab)
    owner = _ids(alias_owner, vocab)
    n_entities, n_read = len(vocab), len(h)
    del heads, rels, tails
    has_alias = np.zeros(n_entities, dtype=bool)
    has_alias[owner] = True
    ok = has_alias[h] & has_alias[t]
    missing = int((~ok).sum())
    if missing and on_error != "skip":
        i = int(np.argmin(ok))
        name = lambda k: vocab[int(k)].as_py()  # noqa: E731
        who = name(h[i]) if not has_alias[h[i]] else name(t[i])
        raise DataError(
            f"{kg}: triple {i + 1} ({name(h[i])}, {relations[int(r[i])].as_py()}, {name(t[i])}) names "
            f"entity {who!r} with no alias; add it to the alias file or pass --on_error skip"
        )
    # the relations of the triples kept (one only in triples without aliases is in no output)
    used = sorted_unique(r[ok])
    relations = relations.take(pa.array(used))
    triples = _distinct_rows(h[ok], np.searchsorted(used, r[ok]), t[ok], n_entities, len(relations))
    del h, r, t, ok
    in_kg = np.zeros(n_entities, dtype=bool)  # of the triples kept
    in_kg[triples[:, 0]] = in_kg[triples[:, 2]] = True
    pair_key = triples[:, 0] * n_entities + triples[:, 2]
    pair_triple = np.argsort(pair_key, kind="stable")

    StringTable.write(folder, "entities", vocab)
    first_line = np.zeros(n_entities, dtype=np.int64)  # each entity's first alias line, in file order
    _, first = np.unique(owner, return_index=True)
    first_line[owner[first]] = first
    surface_text = pc.fill_null(alias_form.take(pa.array(first_line, mask=~has_alias)), "")
    StringTable.write(folder, "surfaces", surface_text)
    np.save(folder / "in_kg.npy", in_kg)
    (folder / "relations.txt").write_text("\n".join(relations.to_pylist()), encoding="utf-8")
    np.save(folder / "triples.npy", triples)
    np.save(folder / "pair_key.npy", pair_key[pair_triple])
    np.save(folder / "pair_triple.npy", pair_triple)
    n_keys = _write_aliases(folder, alias_form.to_pylist(), owner, case)
    return {
        "format": INDEX_FORMAT,
        "case": case,
        "kg_entities": int(in_kg.sum()),
        "entities": n_entities,
        "relations": len(relations),
        "triples_read": n_read,
        "triples": int(len(triples)),
        "kg_triples_without_alias": missing,
        "alias_keys": n_keys,
    }


def _distinct_rows(
    h: np.ndarray, r: np.ndarray, t: np.ndarray, n_entities: int, n_relations: int
) -> np.ndarray:
    """[n, 3] the distinct (h, r, t) rows, sorted: through one int64 key where it fits."""
    if n_entities * n_entities * max(n_relations, 1) < 2**62:
        key = sorted_unique((h * n_relations + r) * n_entities + t)
        out = np.empty((len(key), 3), dtype=np.int64)
        out[:, 2] = key % n_entities
        key //= n_entities
        out[:, 1], out[:, 0] = key % n_relations, key // n_relations
        return out
    return np.unique(np.stack([h, r, t], axis=1), axis=0)


def _write_aliases(
    folder: Path, alias_text: list[str], owner: np.ndarray, case: str, block: int = 1 << 16
) -> int:
    """The matcher's keys: each distinct alias key once, owned by the entity of the smallest name that
    has it (as kg.Linker), sorted by (length, hash)."""
    keys = [fold_case(a) for a in alias_text] if case == "ignore" else alias_text
    bad = next((k for k in keys if SEP in k), None)
    if bad is not None:
        raise DataError(
            f"alias {bad!r} holds a NUL character, which no text can match; remove it from the aliases"
        )
    lengths = np.fromiter((len(k) for k in keys), dtype=np.int64, count=len(keys))
    hashes = np.zeros(len(keys), dtype=np.uint64)
    for b in range(0, len(keys), block):  # the hash of a key does not depend on its neighbours
        part = keys[b : b + block]
        g, p = _prefix(_code_points("".join(part)))
        end = np.cumsum(lengths[b : b + block])
        hashes[b : b + len(part)] = _hashes(g, p, end - lengths[b : b + block], end)
    order = np.lexsort((owner, hashes, lengths))
    keep = np.ones(len(order), dtype=bool)
    same = (lengths[order][1:] == lengths[order][:-1]) & (hashes[order][1:] == hashes[order][:-1])
    for k in np.flatnonzero(same).tolist():  # equal hashes: the same key (or, rarely, a collision)
        seen_first = k
        while seen_first > 0 and same[seen_first - 1]:
            seen_first -= 1
        if any(keys[order[j]] == keys[order[k + 1]] for j in range(seen_first, k + 1) if keep[j]):
            keep[k + 1] = False
    order = order[keep]
    L = lengths[order]
    distinct, first = np.unique(L, return_index=True)
    np.save(folder / "alias_lengths.npy", distinct)
    np.save(folder / "alias_bounds.npy", np.append(first, len(order)).astype(np.int64))
    np.save(folder / "alias_hash.npy", hashes[order])
    np.save(folder / "alias_entity.npy", owner[order])
    kept = [keys[i] for i in order.tolist()]
    StringTable.write(folder, "alias", kept)
    # the buckets of the keys' first (up to) three characters: about 8 buckets a key, 4 KiB to 16 MiB
    buckets = 1 << min(max(int(8 * len(kept)).bit_length(), 12), 24)
    starts = np.zeros(buckets, dtype=bool)
    for b in range(0, len(kept), block):
        part = kept[b : b + block]
        cp = _code_points("".join(k[:3] for k in part))
        n = np.fromiter((min(len(k), 3) for k in part), dtype=np.int64, count=len(part))
        at = np.cumsum(n) - n
        padded = np.append(cp, np.zeros(3, np.uint32)).astype(np.uint64)
        c = [np.where(n > i, padded[at + np.minimum(i, n - 1)], 0) for i in range(3)]
        starts[_bucket(c[0], c[1], c[2], n.astype(np.uint64), buckets)] = True
    np.save(folder / "alias_starts.npy", starts)
    return int(len(order))


def _bucket(c0: np.ndarray, c1: np.ndarray, c2: np.ndarray, n: np.ndarray, buckets: int) -> np.ndarray:
    """A bucket (of a power of two) of up to three code points and their count: the matcher's filter of
    where a key can start."""
    with np.errstate(over="ignore"):
        h = ((c0 * np.uint64(0x9E3779B1) + c1) * np.uint64(0x85EBCA77) + c2) * np.uint64(0xC2B2AE3D) + n
        return ((h ^ (h >> np.uint64(29))) & np.uint64(buckets - 1)).astype(np.int64)
