"""Prompt emphasis and long prompts, with AUTOMATIC1111's semantics.

Users bring prompts written for A1111: ``(word)`` multiplies attention by 1.1, ``[word]`` divides
by 1.1, ``(word:1.3)`` sets an explicit factor, ``\\(`` escapes a bracket, ``BREAK`` starts a new
77-token chunk, and unbalanced brackets close at the end of the prompt. Prompts longer than 75
tokens are cut into chunks of 75 (moved back to the last comma when it is at most 20 tokens away),
each wrapped in start/end tokens, encoded separately and concatenated along the sequence.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

ROUND_BRACKET_FACTOR = 1.1
SQUARE_BRACKET_FACTOR = 1 / 1.1
CHUNK_TOKENS = 75  # a 77-token window minus start and end
COMMA_BACKTRACK = 20  # A1111 default "comma_padding_backtrack"

# One lexical unit of the emphasis grammar per match. Order matters: escapes before brackets,
# ":number)" before a bare ")", and a lone ":" only after plain text failed to match.
_UNIT = re.compile(
    r"""
    (?P<escape>\\[()\[\]\\]|\\)
  | (?P<open_round>\()
  | (?P<open_square>\[)
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
  | (?P<close_round>\))
  | (?P<close_square>\])
  | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass
class WeightedText:
    """A run of prompt text and the attention factor it carries; ``is_break`` marks BREAK."""

    text: str
    weight: float = 1.0
    is_break: bool = False


def parse_emphasis(prompt: str) -> list[WeightedText]:
    """Split a prompt into runs of equal attention weight (A1111 ``parse_prompt_attention``)."""
    runs: list[WeightedText] = []
    open_rounds: list[int] = []
    open_squares: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run.weight *= factor

    for match in _UNIT.finditer(prompt):
        kind = match.lastgroup
        if kind == "escape":
            runs.append(WeightedText(match.group()[1:]))
        elif kind == "open_round":
            open_rounds.append(len(runs))
        elif kind == "open_square":
            open_squares.append(len(runs))
        elif kind == "weight" and open_rounds:
            scale_from(open_rounds.pop(), float(match.group("weight")))
        elif kind == "close_round" and open_rounds:
            scale_from(open_rounds.pop(), ROUND_BRACKET_FACTOR)
        elif kind == "close_square" and open_squares:
            scale_from(open_squares.pop(), SQUARE_BRACKET_FACTOR)
        else:
            # Plain text, or a closing bracket / ":w)" with nothing open: kept literally.
            for index, part in enumerate(_BREAK.split(match.group())):
                if index:
                    runs.append(WeightedText("BREAK", -1.0, is_break=True))
                runs.append(WeightedText(part))

    for start in open_rounds:
        scale_from(start, ROUND_BRACKET_FACTOR)
    for start in open_squares:
        scale_from(start, SQUARE_BRACKET_FACTOR)
    if not runs:
        return [WeightedText("")]

    merged = [runs[0]]
    for run in runs[1:]:
        if run.weight == merged[-1].weight and not (run.is_break or merged[-1].is_break):
            merged[-1].text += run.text
        else:
            merged.append(run)
    return merged


@dataclass
class TokenChunk:
    """One encoder window: token ids and per-token attention factors, both of length 77."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def chunk_prompt(
    prompt: str,
    encode: Callable[[str], list[int | tuple[int, ...]]],
    *,
    start_token: int,
    end_token: int,
    pad_token: int,
    comma_token: int | None,
    emphasis: bool = True,
) -> list[TokenChunk]:
    """Tokenise a prompt into 77-token windows with weights, splitting like A1111.

    ``encode`` may give a tuple of ids for a unit that must not be split (an embedding's vectors).
    """
    runs = parse_emphasis(prompt) if emphasis else [WeightedText(prompt)]
    chunks: list[TokenChunk] = []
    current = TokenChunk()
    last_comma = -1

    def close_current() -> None:
        nonlocal current, last_comma
        missing = CHUNK_TOKENS - len(current.tokens)
        current.tokens = [start_token, *current.tokens, *([pad_token] * missing)]
        current.weights = [1.0, *current.weights, *([1.0] * missing)]
        # The end token follows the text directly, padding after it (as the reference tokenizers).
        current.tokens.insert(CHUNK_TOKENS + 1 - missing, end_token)
        current.weights.insert(CHUNK_TOKENS + 1 - missing, 1.0)
        chunks.append(current)
        current = TokenChunk()
        last_comma = -1

    for run in runs:
        if run.is_break:
            close_current()
            continue
        for token in encode(run.text):
            if isinstance(token, tuple):  # an embedding's vectors: one window holds them all
                if len(token) > CHUNK_TOKENS:
                    raise ValueError(f"an embedding of {len(token)} vectors does not fit a {CHUNK_TOKENS}-token window")
                if len(current.tokens) + len(token) > CHUNK_TOKENS:
                    close_current()
                current.tokens += token
                current.weights += [run.weight] * len(token)
                continue
            if token == comma_token:
                last_comma = len(current.tokens)
            elif (
                len(current.tokens) == CHUNK_TOKENS
                and last_comma != -1
                and len(current.tokens) - last_comma <= COMMA_BACKTRACK
            ):
                # Move the words after the last comma to the next window, so a phrase stays whole.
                carried = TokenChunk(current.tokens[last_comma + 1:], current.weights[last_comma + 1:])
                del current.tokens[last_comma + 1:], current.weights[last_comma + 1:]
                close_current()
                current = carried
            if len(current.tokens) == CHUNK_TOKENS:
                close_current()
            current.tokens.append(token)
            current.weights.append(run.weight)
    if current.tokens or not chunks:
        close_current()
    return chunks


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token's embedding by its factor, then restore the overall mean (A1111)."""
    original_mean = hidden.mean()
    scaled = hidden * weights.to(hidden.dtype).unsqueeze(-1)
    scaled_mean = scaled.mean()
    # The ratio means nothing for embeddings centred on zero (an encoder whose final LayerNorm has no
    # bias) and would blow up; real CLIP towers have a clearly non-zero mean.
    if scaled_mean.abs() <= 1e-4 * scaled.abs().mean():
        return scaled
    return scaled * (original_mean / scaled_mean)


def encode_weighted_prompts(
    prompts: Sequence[str],
    chunker: Callable[[str], list[TokenChunk]],
    encode_tokens: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode prompts into [B, 77 * n_chunks, width]; shorter prompts are padded with empty chunks.

    ``encode_tokens`` returns the hidden states of a window and, for encoders that have one, a
    pooled output; the pooled output of each prompt's first window comes back with the hidden
    states, unweighted (A1111).
    """
    per_prompt = [chunker(prompt) for prompt in prompts]
    n_chunks = max(len(chunks) for chunks in per_prompt)
    empty = chunker("")[0]
    for chunks in per_prompt:
        chunks.extend([empty] * (n_chunks - len(chunks)))
    pieces, first_pooled = [], None
    for index in range(n_chunks):
        tokens = torch.tensor([chunks[index].tokens for chunks in per_prompt], dtype=torch.long)
        weights = torch.tensor([chunks[index].weights for chunks in per_prompt], dtype=torch.float32)
        hidden, pooled = encode_tokens(tokens)
        if index == 0:
            first_pooled = pooled
        if not torch.all(weights == 1.0):
            hidden = torch.stack([apply_weights(h, w) for h, w in zip(hidden, weights)])
        pieces.append(hidden)
    return torch.cat(pieces, dim=1), first_pooled
