"""Prompt emphasis and chunking, checked on AUTOMATIC1111's documented examples."""
import pytest
import torch

from latent_diffusion.pipelines.prompts import (
    CHUNK_TOKENS,
    apply_weights,
    chunk_prompt,
    encode_weighted_prompts,
    parse_emphasis,
)


def runs(prompt):
    return [(run.text, pytest.approx(run.weight)) for run in parse_emphasis(prompt)]


# The examples from the docstring of A1111's modules/prompt_parser.py::parse_prompt_attention.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
            (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize("prompt, expected", A1111_EXAMPLES)
def test_a1111_documented_examples(prompt, expected):
    assert runs(prompt) == [(text, pytest.approx(weight)) for text, weight in expected]


def test_square_brackets_divide_and_explicit_weight():
    assert runs("[faint]") == [("faint", pytest.approx(1 / 1.1))]
    assert runs("(a:0.5) (b:1.25)") == [("a", 0.5), (" ", 1.0), ("b", 1.25)]


def test_stray_closing_bracket_and_colon_are_literal():
    assert runs("a) b] c:d") == [("a) b] c:d", 1.0)]


def test_break_splits_and_empty_prompt():
    parsed = parse_emphasis("a cat BREAK a dog")
    assert [r.text for r in parsed] == ["a cat", "BREAK", "a dog"]
    assert parsed[1].is_break
    assert runs("") == [("", 1.0)]


# A toy tokenizer: one id per word, commas are their own token; good enough to test windowing.
COMMA = 267


def toy_encode(text):
    ids = []
    for word in text.replace(",", " , ").split():
        ids.append(COMMA if word == "," else 1000 + len(word))
    return ids


def chunks_of(prompt, pad=49407):
    return chunk_prompt(prompt, toy_encode, start_token=49406, end_token=49407, pad_token=pad, comma_token=COMMA)


def test_short_prompt_is_one_window_with_end_then_padding():
    (chunk,) = chunks_of("a red (circle:1.5)", pad=0)
    assert len(chunk.tokens) == len(chunk.weights) == CHUNK_TOKENS + 2
    assert chunk.tokens[:5] == [49406, 1001, 1003, 1006, 49407]
    assert chunk.tokens[5:] == [0] * 72
    assert chunk.weights[3] == 1.5 and chunk.weights[2] == 1.0


def test_long_prompt_splits_at_last_comma_within_20_tokens():
    words = " ".join(["w"] * 70) + " , " + " ".join(["x"] * 10)
    first, second = chunks_of(words)
    # 70 words + comma fit in the first window; the 4 words after the comma that would have filled
    # it are carried over so that "x x x x x x x x x x" stays in one window.
    assert first.tokens[1:72] == [1001] * 70 + [COMMA]
    assert first.tokens[72:] == [49407] * 5
    assert second.tokens[1:11] == [1001] * 10 and second.tokens[11] == 49407


def test_long_prompt_without_comma_splits_at_75():
    chunks = chunks_of(" ".join(["w"] * 160))
    assert len(chunks) == 3
    assert all(len(c.tokens) == 77 for c in chunks)
    assert chunks[0].tokens[76] == 49407 and chunks[2].tokens[1:11] == [1001] * 10


def test_break_starts_a_new_window():
    chunks = chunks_of("a cat BREAK a dog")
    assert len(chunks) == 2 and chunks[1].tokens[1:3] == [1001, 1003]


def test_apply_weights_keeps_mean_and_scales_relatively():
    hidden = torch.randn(77, 8) + 0.5
    weights = torch.ones(77)
    weights[3] = 1.5
    out = apply_weights(hidden, weights)
    assert torch.allclose(out.mean(), hidden.mean(), atol=1e-6)
    ratio = out / hidden
    assert torch.allclose(ratio[3], 1.5 * ratio[0], rtol=1e-5)
    assert torch.equal(apply_weights(hidden, torch.ones(77)), hidden)


def test_encode_weighted_prompts_concatenates_windows_and_pads_batch():
    def chunker(prompt):
        return chunks_of(prompt)

    def fake_encoder(tokens):
        return tokens.float().unsqueeze(-1).expand(-1, -1, 4).clone(), tokens[:, 1].float()

    out, pooled = encode_weighted_prompts(["short", " ".join(["w"] * 100)], chunker, fake_encoder)
    assert out.shape == (2, 154, 4)
    # The pooled output is the first window's: its first word, not the long prompt's 76th.
    assert pooled.tolist() == out[:, 1, 0].tolist()
    # The short prompt's second window is the empty prompt's window: start, end, padding.
    assert out[0, 77, 0] == 49406 and out[0, 78, 0] == 49407
