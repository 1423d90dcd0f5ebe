"""Text tokenizers that run offline: CLIP byte-level BPE (SD 1.x/2.x) and BERT WordPiece (LDM paper).

The CLIP vocabulary ships with the package (``assets/bpe_simple_vocab_16e6.txt.gz``, the merges
file OpenAI released with CLIP); the 49,408 token ids are derived from it the way CLIP does:
256 byte symbols, the same symbols with the end-of-word marker ``</w>``, one token per merge, then
``<|startoftext|>`` and ``<|endoftext|>``.
"""
from __future__ import annotations

import functools
import gzip
import html
import os
import unicodedata
from dataclasses import dataclass
from importlib import resources
from typing import Literal, Sequence

import regex
import torch

CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP was trained with 49,152 - 256 - 2 merges; the file holds more, which CLIP never used.
CLIP_NUM_MERGES = 49152 - 256 - 2

# The CLIP pre-tokeniser: English contractions, runs of letters, single digits, runs of other
# non-space symbols. Text is lowercased before this, as in every reference. OpenCLIP also treats
# special-token text as that token; transformers (whose byte-level step re-splits such a word
# into "<|", "endoftext", "|>") does not.
_CLIP_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_CLIP_WORD_PATTERN = regex.compile(_CLIP_WORDS, regex.IGNORECASE)
_OPENCLIP_WORD_PATTERN = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|" + _CLIP_WORDS, regex.IGNORECASE)
_WHITESPACE_RUN = regex.compile(r"\s+")
_SPECIAL_TOKEN_SPLIT = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")


def byte_to_symbol() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters.

    Printable latin-1 bytes stand for themselves; the rest are moved to code points 256 and up in
    byte order, so every BPE symbol is a visible character. The dict's order (printable bytes
    first) is the order of the first 256 token ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    next_code_point = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(next_code_point)
            next_code_point += 1
    return table


@dataclass(frozen=True)
class CLIPVocabulary:
    """Token ids and merge ranks of the CLIP BPE."""

    token_to_id: dict[str, int]
    merge_ranks: dict[tuple[str, str], int]

    @property
    def merges(self) -> list[tuple[str, str]]:
        return sorted(self.merge_ranks, key=self.merge_ranks.__getitem__)


@functools.lru_cache(maxsize=4)
def load_clip_vocabulary(path: str | None = None) -> CLIPVocabulary:
    """Read the gzipped CLIP merges file (the packaged one by default) into ids and merge ranks."""
    if path is None:
        data = resources.files("latent_diffusion").joinpath("assets", CLIP_VOCAB_FILE).read_bytes()
    else:
        with open(path, "rb") as handle:
            data = handle.read()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # Line 0 is a version header.
    merges = [tuple(line.split()) for line in lines[1 : 1 + CLIP_NUM_MERGES]]
    if len(merges) != CLIP_NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path or CLIP_VOCAB_FILE}: not a CLIP BPE merges file")
    symbols = list(byte_to_symbol().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
    tokens += [START_OF_TEXT, END_OF_TEXT]
    return CLIPVocabulary(
        token_to_id={t: i for i, t in enumerate(tokens)},
        merge_ranks={m: rank for rank, m in enumerate(merges)},
    )


def _normalize_like_transformers(text: str) -> str:
    # transformers 5's CLIPTokenizer (what diffusers' SD pipelines and A1111 use for SD 1):
    # NFC, whitespace runs -> one space, lowercase. No ftfy, no HTML unescaping.
    text = unicodedata.normalize("NFC", text)
    return _WHITESPACE_RUN.sub(" ", text).lower()


def _normalize_like_openclip(text: str) -> str:
    # open_clip.tokenize (the SD 2 reference): ftfy repair (which also applies NFC), HTML entities
    # unescaped twice, whitespace collapsed, lowercase.
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip().lower()


class CLIPTokenizer:
    """CLIP byte-level BPE tokenizer producing ``[B, context_length]`` id tensors.

    ``pad_with_eos=True`` pads with ``<|endoftext|>`` (SD 1: transformers' tokenizer); ``False``
    pads with 0 (SD 2: OpenCLIP). ``normalization`` picks whose text cleanup to reproduce.
    """

    def __init__(
        self,
        pad_with_eos: bool = True,
        context_length: int = 77,
        *,
        normalization: Literal["transformers", "openclip"] = "transformers",
        vocab_path: str | os.PathLike | None = None,
    ) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end token), got {context_length}")
        if normalization not in ("transformers", "openclip"):
            raise ValueError(f"normalization must be 'transformers' or 'openclip', got {normalization!r}")
        self.pad_with_eos = pad_with_eos
        self.context_length = context_length
        self.normalization = normalization
        if normalization == "transformers":
            self._normalize, self._word_pattern = _normalize_like_transformers, _CLIP_WORD_PATTERN
        else:
            self._normalize, self._word_pattern = _normalize_like_openclip, _OPENCLIP_WORD_PATTERN
        vocabulary = load_clip_vocabulary(None if vocab_path is None else os.fspath(vocab_path))
        self.token_to_id = vocabulary.token_to_id
        self.merge_ranks = vocabulary.merge_ranks
        self.start_id = self.token_to_id[START_OF_TEXT]
        self.end_id = self.token_to_id[END_OF_TEXT]
        self.pad_id = self.end_id if pad_with_eos else 0
        self._byte_symbols = byte_to_symbol()
        # Per instance so that tokenizers with different vocabularies never share results.
        self._bpe_cached = functools.lru_cache(maxsize=65536)(self._bpe)

    @property
    def vocab_size(self) -> int:
        return len(self.token_to_id)

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Merge the symbols of one pre-token, lowest-ranked pair first, until no merge applies."""
        parts = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(parts) > 1:
            ranked = [(self.merge_ranks.get(pair, -1), pair) for pair in zip(parts, parts[1:])]
            ranked = [(rank, pair) for rank, pair in ranked if rank >= 0]
            if not ranked:
                break
            _, (left, right) = min(ranked)
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == left and parts[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens and without truncation."""
        if not isinstance(text, str):
            raise ValueError(f"CLIPTokenizer.encode expects a str, got {type(text).__name__}")
        if self.normalization == "transformers":
            # transformers matches the special tokens in the raw text only (case-sensitively);
            # anything else that reads like one after lowercasing is tokenised as plain text.
            segments = _SPECIAL_TOKEN_SPLIT.split(text)
        else:
            segments = [text]
        ids: list[int] = []
        for segment in segments:
            if segment in (START_OF_TEXT, END_OF_TEXT):
                ids.append(self.token_to_id[segment])
                continue
            for word in self._word_pattern.findall(self._normalize(segment)):
                if word in (START_OF_TEXT, END_OF_TEXT):
                    ids.append(self.token_to_id[word])
                    continue
                symbols = "".join(self._byte_symbols[b] for b in word.encode("utf-8"))
                ids.extend(self.token_to_id[piece] for piece in self._bpe_cached(symbols))
        return ids

    def words(self, text: str) -> list[str]:
        """The words (and runs of symbols) ``text`` splits into before BPE, normalised as :meth:`encode` does."""
        return self._word_pattern.findall(self._normalize(text))

    def pad(self, ids: Sequence[int]) -> list[int]:
        """Frame already-encoded ids: start token, ids cut to fit, end token, padding."""
        body = list(ids)[: self.context_length - 2]
        row = [self.start_id, *body, self.end_id]
        return row + [self.pad_id] * (self.context_length - len(row))

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Tokenize one prompt or a list of prompts into a LongTensor ``[B, context_length]``."""
        prompts = _as_prompt_list(prompts, "CLIPTokenizer")
        return torch.tensor([self.pad(self.encode(p)) for p in prompts], dtype=torch.long)


def _as_prompt_list(prompts: str | Sequence[str], who: str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{who}: got an empty list of prompts")
    for p in prompts:
        if not isinstance(p, str):
            raise ValueError(f"{who}: prompts must be str, got {type(p).__name__}")
    return prompts


# ---------------------------------------------------------------------------------------------
# BERT WordPiece (bert-base-uncased), for the latent-diffusion paper's text-to-image model.


def _is_punctuation(char: str) -> bool:
    # BERT counts all non-alphanumeric ASCII symbols as punctuation, plus Unicode P* categories.
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F
    )


class BertWordPieceTokenizer:
    """Uncased BERT WordPiece tokenizer read from a local ``vocab.txt`` (one token per line).

    Reproduces ``BertTokenizerFast.from_pretrained("bert-base-uncased")`` as CompVis'
    ``BERTTokenizer`` calls it: ``[CLS] ids [SEP]``, truncated and padded with ``[PAD]`` to
    ``max_length``.
    """

    max_word_chars = 100  # longer words become a single [UNK], as in BERT

    def __init__(self, vocab_path: str | os.PathLike | None = None, max_length: int = 77) -> None:
        if vocab_path is None:
            raise ValueError(
                "BertWordPieceTokenizer needs the bert-base-uncased vocab.txt (30,522 lines), which is not "
                "shipped with this package; pass vocab_path=<path to vocab.txt>"
            )
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
        if not os.path.isfile(vocab_path):
            raise ValueError(f"BERT vocabulary file not found: {os.fspath(vocab_path)!r}")
        with open(vocab_path, encoding="utf-8") as handle:
            tokens = [line.rstrip("\n") for line in handle]
        self.token_to_id = {token: i for i, token in enumerate(tokens)}
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in self.token_to_id]
        if missing:
            raise ValueError(f"{os.fspath(vocab_path)!r} lacks the special token(s) {missing}")
        self.max_length = max_length
        self.pad_id, self.unk_id = self.token_to_id["[PAD]"], self.token_to_id["[UNK]"]
        self.cls_id, self.sep_id = self.token_to_id["[CLS]"], self.token_to_id["[SEP]"]

    @property
    def vocab_size(self) -> int:
        return len(self.token_to_id)

    def _normalize(self, text: str) -> str:
        chars = []
        for char in text:
            cp = ord(char)
            if cp == 0 or cp == 0xFFFD:
                continue
            category = unicodedata.category(char)
            if char in " \t\n\r" or category == "Zs":
                chars.append(" ")
            elif category.startswith("C"):
                continue
            elif _is_cjk(cp):
                chars.append(f" {char} ")
            else:
                chars.append(char)
        # Uncased BERT strips accents: decompose, drop the combining marks.
        decomposed = unicodedata.normalize("NFD", "".join(chars).lower())
        return "".join(c for c in decomposed if unicodedata.category(c) != "Mn")

    def _split_words(self, text: str) -> list[str]:
        words: list[str] = []
        for chunk in text.split():
            current = ""
            for char in chunk:
                if _is_punctuation(char):
                    if current:
                        words.append(current)
                        current = ""
                    words.append(char)
                else:
                    current += char
            if current:
                words.append(current)
        return words

    def _word_pieces(self, word: str) -> list[int]:
        if len(word) > self.max_word_chars:
            return [self.unk_id]
        pieces: list[int] = []
        start = 0
        while start < len(word):
            # Greedy longest match; continuation pieces carry the "##" prefix.
            for end in range(len(word), start, -1):
                candidate = word[start:end] if start == 0 else "##" + word[start:end]
                if candidate in self.token_to_id:
                    pieces.append(self.token_to_id[candidate])
                    start = end
                    break
            else:
                return [self.unk_id]
        return pieces

    def encode(self, text: str) -> list[int]:
        """WordPiece ids of ``text`` without [CLS]/[SEP] and without truncation."""
        if not isinstance(text, str):
            raise ValueError(f"BertWordPieceTokenizer.encode expects a str, got {type(text).__name__}")
        return [i for word in self._split_words(self._normalize(text)) for i in self._word_pieces(word)]

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Tokenize one prompt or a list of prompts into a LongTensor ``[B, max_length]``."""
        rows = []
        for prompt in _as_prompt_list(prompts, "BertWordPieceTokenizer"):
            row = [self.cls_id, *self.encode(prompt)[: self.max_length - 2], self.sep_id]
            rows.append(row + [self.pad_id] * (self.max_length - len(row)))
        return torch.tensor(rows, dtype=torch.long)
