"""Tokenizers against independent references: transformers (SD 1's tokenizer), instant-clip-tokenizer
(a separate CLIP vocabulary), transformers' BertTokenizer (the LDM paper's WordPiece)."""
import json
import random

import pytest
import torch

from latent_diffusion.models.tokenizer import (
    BertWordPieceTokenizer,
    CLIPTokenizer,
    load_clip_vocabulary,
)

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "Hello, World!!! (masterpiece:1.2), [best quality] {x|y} -- 3.14 / 100%",
    "Numbers 0 12 345 6789 and 1st 2nd 3rd",
    "UPPER lower MiXeD CamelCase",
    "don't you're I'll we've she'd it's they're 'quoted' ’curly’",
    "café naïve résumé",  # precomposed accents
    "cafe\u0301 nai\u0308ve",  # decomposed accents: NFC must make these equal to the line above
    "emoji 😀🐱👍🏽 flags 🇫🇷🇯🇵",
    "東京の猫 中文 한국어 Ελληνικά русский العربية",
    "  multiple   spaces\n\nnewlines\ttabs\r\n and trailing  ",
    "Tom &amp; Jerry &lt;b&gt; &quot;html&quot; &#39;",
    "",
    " ",
    "İstanbul straße ﬁne Ⅳ ½ x² ǅ",
    "non\u00a0breaking\u2003em space\u200bzero width",
    "<|startoftext|> special <|endoftext|> tokens <|ENDOFTEXT|>",
    " ".join(f"word{i}" for i in range(60)),  # > 77 tokens: truncation
    "x" * 500,
]


@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """transformers' CLIPTokenizer (fast = slow in v5; diffusers' SD pipelines use it) on our vocabulary."""
    vocabulary = load_clip_vocabulary()
    folder = tmp_path_factory.mktemp("clip_vocab")
    (folder / "vocab.json").write_text(json.dumps(vocabulary.token_to_id), encoding="utf-8")
    merges = "\n".join(" ".join(pair) for pair in vocabulary.merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
    return transformers.CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77
    )


def _reference_ids(reference, prompts):
    out = reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return out["input_ids"]


def test_vocabulary_layout():
    vocabulary = load_clip_vocabulary()
    assert len(vocabulary.token_to_id) == 49408
    assert len(set(vocabulary.token_to_id.values())) == 49408
    assert vocabulary.token_to_id["<|startoftext|>"] == 49406
    assert vocabulary.token_to_id["<|endoftext|>"] == 49407
    assert len(vocabulary.merge_ranks) == 49408 - 512 - 2


@pytest.mark.parametrize("prompt", PROMPTS)
def test_matches_transformers(ours, reference, prompt):
    assert ours(prompt).tolist() == _reference_ids(reference, prompt).tolist()


def test_batch_matches_transformers(ours, reference):
    got = ours(PROMPTS)
    assert got.dtype == torch.long and got.shape == (len(PROMPTS), 77)
    assert torch.equal(got, _reference_ids(reference, PROMPTS))


def test_random_text_matches_transformers(ours, reference):
    rng = random.Random(0)
    alphabet = list("abcXYZ019 ,.!?'\"-_()[]{}<>|&;:\n\t") + [
        "é", "e\u0301", "ñ", "ß", "İ", "ﬁ", "Ⅳ", "½", "東", "猫", "😀", "🇫🇷", "\u00a0", "\u2003",
        "\u200b", "ا", "д", "Ω", "\u0301", "\x00", "\ufffd", "'s", "'t", "&amp;", "<|endoftext|>", "’",
    ]
    prompts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(400)]
    assert ours(prompts).tolist() == _reference_ids(reference, prompts).tolist()


def test_decomposed_accent_equals_precomposed(ours):
    assert ours.encode("cafe\u0301") == ours.encode("café")


def test_encode_does_not_truncate(ours, reference):
    prompt = " ".join(f"word{i}" for i in range(60))
    ids = ours.encode(prompt)
    assert len(ids) > 75
    assert ids == reference(prompt, add_special_tokens=False)["input_ids"]
    assert ours(prompt)[0, 1:76].tolist() == ids[:75]


def test_matches_instant_clip_tokenizer():
    """An independent CLIP vocabulary (compiled into instant-clip-tokenizer) agrees with ours.

    It pads with 0 and skips Unicode normalisation, so the prompts here are already NFC.
    """
    instant = pytest.importorskip("instant_clip_tokenizer")
    theirs = instant.Tokenizer()
    ours = CLIPTokenizer(pad_with_eos=False)
    prompts = [p for p in PROMPTS if "\u0301" not in p and "\u0308" not in p and "&" not in p and "<|" not in p]
    for prompt in prompts:
        assert ours.encode(prompt) == list(theirs.encode(prompt)), prompt
    assert ours(prompts).tolist() == theirs.tokenize_batch(prompts, context_length=77).tolist()


def test_zero_padding_structure():
    tokenizer = CLIPTokenizer(pad_with_eos=False)
    ids = tokenizer.encode("a red cube on a table")
    row = tokenizer("a red cube on a table")[0].tolist()
    assert row[: len(ids) + 2] == [49406, *ids, 49407]
    assert row[len(ids) + 2 :] == [0] * (77 - len(ids) - 2)
    long_row = tokenizer("x " * 200)[0].tolist()
    assert long_row[0] == 49406 and long_row[-1] == 49407 and 0 not in long_row


def test_eos_padding_structure():
    row = CLIPTokenizer(pad_with_eos=True)("a red cube")[0].tolist()
    assert row[0] == 49406 and set(row[4:]) == {49407}


def test_openclip_normalization_unescapes_html_and_repairs_mojibake():
    instant = pytest.importorskip("instant_clip_tokenizer")
    theirs = instant.Tokenizer()
    tokenizer = CLIPTokenizer(pad_with_eos=False, normalization="openclip")
    assert tokenizer.encode("Tom &amp;amp; Jerry") == list(theirs.encode("tom & jerry"))
    assert tokenizer.encode("cafÃ©  <|ENDOFTEXT|>") == [*theirs.encode("café"), 49407]


def test_custom_context_length():
    tokenizer = CLIPTokenizer(context_length=8)
    assert tokenizer("one two three four five six seven eight").shape == (1, 8)


def test_bad_input_is_a_clear_error(ours):
    with pytest.raises(ValueError, match="str"):
        ours([1, 2])
    with pytest.raises(ValueError, match="empty"):
        ours([])
    with pytest.raises(ValueError, match="context_length"):
        CLIPTokenizer(context_length=1)
    with pytest.raises(ValueError, match="normalization"):
        CLIPTokenizer(normalization="ftfy")


# --- BERT WordPiece -----------------------------------------------------------------------------

BERT_VOCAB = (
    ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + ["a", "photo", "of", "cat", "##s", "the", "un", "##believ", "##able", ",", "!", "caf", "##e", "東",
       "京", "don", "'", "t", "x", "##x", "ab", "##c", "##d", "(", ")", "1", "##2", "naive", "-", "."]
)
BERT_PROMPTS = [
    "A photo of cats, unbelievable!",
    "CAFÉ naïve nai\u0308ve",
    "東京 don't",
    "xxxx abcd abcde (12) a-b.c",
    "  spaces\t\ttabs\nnewlines \u00a0 ",
    "zzz unknown words",
    "x" * 150,
    "",
    " ".join(["cat"] * 100),
]


@pytest.fixture(scope="module")
def bert_vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("prompt", BERT_PROMPTS)
def test_bert_matches_transformers(bert_vocab_file, prompt):
    reference = transformers.BertTokenizer(vocab=str(bert_vocab_file), model_max_length=77)
    expected = reference(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert BertWordPieceTokenizer(bert_vocab_file)(prompt)[0].tolist() == expected


def test_bert_needs_a_vocabulary_file(tmp_path):
    with pytest.raises(ValueError, match="vocab.txt"):
        BertWordPieceTokenizer()
    with pytest.raises(ValueError, match="not found"):
        BertWordPieceTokenizer(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="special"):
        BertWordPieceTokenizer(tmp_path / "bad.txt")
