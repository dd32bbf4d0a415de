"""The tokenizers data_prep can use: a SentencePiece model file, or a Hugging Face tokenizer folder.

Both give token ids and, when mentions need them, the character span of every token. A dataset
keeps its tokenizer as `tokenizer.model` (SentencePiece) or `tokenizer/` (Hugging Face folder with
`tokenizer.json`); `load_tokenizer` opens either.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_prep.readers import DataError


class SentencePieceTokenizer:
    kind = "sentencepiece"
    name = "tokenizer.model"

    def __init__(self, path: Path):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id, self.bos_id, self.unk_id = self.sp.eos_id(), self.sp.bos_id(), self.sp.unk_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        mask = self.sp.piece_to_id("<mask>")
        self.mask_id = mask if mask != self.unk_id else None
        if self.eos_id < 0:
            raise DataError(
                f"{path}: the SentencePiece model has no end-of-sequence id (eos_id); retrain it with one"
            )
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        norm = proto.normalizer_spec
        self.dummy_prefix = int(norm.add_dummy_prefix)
        # Characters each piece covers, when that is exact (identity normalization, no whitespace
        # squeezing, no byte fallback): offsets are then a cumulative sum, with no per-token Python.
        self.lengths = None
        if (
            norm.name == "identity"
            and not norm.remove_extra_whitespaces
            and not proto.trainer_spec.byte_fallback
        ):
            sp = self.sp
            self.lengths = np.array([len(sp.id_to_piece(i)) for i in range(self.vocab_size)], dtype=np.int64)
            for i in range(self.vocab_size):
                if sp.is_control(i) or sp.is_unknown(i):
                    self.lengths[i] = -1  # an unknown number of characters: that document takes the slow path

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in self.sp.encode(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def char_bounds(self, text: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Character [begin, end) of every token of `text`."""
        if self.lengths is not None:
            piece = self.lengths[ids]
            if (piece >= 0).all():
                end = np.cumsum(piece) - self.dummy_prefix
                return np.maximum(end - piece, 0), end
        proto = self.sp.encode(text, return_type="proto")  # byte offsets: convert to characters
        begin_b = np.fromiter((p.begin for p in proto.pieces), dtype=np.int64, count=len(proto.pieces))
        end_b = np.fromiter((p.end for p in proto.pieces), dtype=np.int64, count=len(proto.pieces))
        cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        char_end_b = np.cumsum(1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000))
        begin = np.searchsorted(char_end_b, begin_b, side="right")
        end = np.searchsorted(char_end_b, end_b, side="left") + 1
        return begin, np.where(end_b > begin_b, end, begin)  # a piece of no bytes (the "▁" of a dummy prefix)


EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "[SEP]")


class HuggingFaceTokenizer:
    """A local folder with tokenizer.json (the `tokenizers` format transformers saves); no downloads."""

    kind = "huggingface"
    name = "tokenizer"

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.path = path
        file = path / "tokenizer.json"
        if not file.is_file():
            raise DataError(
                f"{path}: no tokenizer.json; give a Hugging Face tokenizer folder or a SentencePiece .model"
            )
        self.tok = Tokenizer.from_file(str(file))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        config = (
            json.loads((path / "tokenizer_config.json").read_text())
            if (path / "tokenizer_config.json").is_file()
            else {}
        )

        def token_id(key: str, candidates: tuple[str, ...] = ()) -> int | None:
            token = config.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            for t in ([token] if token else []) + list(candidates):
                i = self.tok.token_to_id(t)
                if i is not None:
                    return i
            return None

        eos = token_id("eos_token", EOS_CANDIDATES)
        if eos is None:
            raise DataError(
                f"{path}: no end-of-sequence token (none of eos_token in tokenizer_config.json, "
                f"{', '.join(EOS_CANDIDATES)}); set eos_token in tokenizer_config.json"
            )
        self.eos_id, self.bos_id, self.unk_id = eos, token_id("bos_token"), token_id("unk_token")
        self.pad_id, self.mask_id = token_id("pad_token"), token_id("mask_token", ("<mask>", "[MASK]"))
        self._offsets: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        self._offsets = {}
        for text, enc in zip(texts, self.tok.encode_batch(texts, add_special_tokens=False)):
            ids = np.asarray(enc.ids, dtype=np.int64)
            offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            self._offsets[id(text)] = (offsets[:, 0], offsets[:, 1])
            out.append(ids)
        return out

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def char_bounds(self, text: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if id(text) in self._offsets:
            return self._offsets[id(text)]
        enc = self.tok.encode(text, add_special_tokens=False)
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        return offsets[:, 0], offsets[:, 1]


def text_start_id(tok: SentencePieceTokenizer | HuggingFaceTokenizer) -> int:
    """The token put before every fine-tuning text (and so before every text of an exported task
    model): the tokenizer's BOS, else its EOS (a document boundary, as in the packed training rows)."""
    return tok.bos_id if tok.bos_id is not None and tok.bos_id >= 0 else tok.eos_id


def load_tokenizer(path: str | Path) -> SentencePieceTokenizer | HuggingFaceTokenizer:
    path = Path(path)
    if path.is_dir():
        return HuggingFaceTokenizer(path)
    if path.is_file():
        return SentencePieceTokenizer(path)
    raise DataError(f"{path}: no such tokenizer (a SentencePiece .model file or a Hugging Face folder)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def copy_tokenizer(src: str | Path, dst: Path) -> None:
    """Copy a SentencePiece file, or only the tokenizer files of a Hugging Face folder (a model folder
    also holds its weights, which a dataset must not take along)."""
    import shutil

    src = Path(src)
    if not src.is_dir():
        shutil.copyfile(src, dst)
        return
    dst.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def find_tokenizer(folder: Path) -> Path | None:
    """The tokenizer a dataset or parts folder holds, if any."""
    for name in (SentencePieceTokenizer.name, HuggingFaceTokenizer.name):
        if (folder / name).exists():
            return folder / name
    return None


class CachedEncoder:
    """encode(text) -> ids, each distinct text encoded once. Blank text gives no ids. For the
    SentencePiece models data_prep trains, encode(a) + encode(b) equals encode("a b") (pieces never
    cross a space), so encoding word-aligned segments separately gives exact token spans."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, text: str) -> np.ndarray:
        if text not in self.cache:
            self.cache[text] = self.tok.encode([text])[0] if text.strip() else np.zeros(0, np.int64)
        return self.cache[text]
