"""A1111 'parameters' PNG metadata: written, read back, and parsed like other tools do."""
import pytest
from PIL import Image

from latent_diffusion.pipelines.png_info import (
    format_parameters,
    model_hash,
    parse_parameters,
    read_png_parameters,
    save_png,
)

SETTINGS = {
    "Steps": 20, "Sampler": "DPM++ 2M Karras", "CFG scale": 7.5, "Seed": 42, "Size": "64x64",
    "Model hash": "0123456789", "Model": "shapes",
}


def test_format_matches_a1111_layout():
    text = format_parameters("a red circle", "blurry", SETTINGS)
    assert text.splitlines() == [
        "a red circle",
        "Negative prompt: blurry",
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 64x64, "
        "Model hash: 0123456789, Model: shapes",
    ]


def test_round_trip_with_multiline_prompt_and_quoted_values():
    settings = dict(SETTINGS, Model='odd, "name": here')
    text = format_parameters("line one,\nline (two:1.2)", "bad\nworse", settings)
    prompt, negative, parsed = parse_parameters(text)
    assert prompt == "line one,\nline (two:1.2)"
    assert negative == "bad\nworse"
    assert parsed == {key: str(value) for key, value in settings.items()}


def test_text_without_settings_line_is_all_prompt():
    prompt, negative, parsed = parse_parameters("just a prompt: with a colon")
    assert prompt == "just a prompt: with a colon" and negative == "" and parsed == {}


def test_png_round_trip(tmp_path):
    text = format_parameters("a red circle", "", SETTINGS)
    path = save_png(Image.new("RGB", (8, 8), "red"), tmp_path / "out.png", text)
    assert read_png_parameters(path) == text
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary file left behind
    assert read_png_parameters(save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", "")) in ("", None)


def test_reading_bad_files_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such image"):
        read_png_parameters(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        read_png_parameters(bad)


def test_model_hash_is_sha256_prefix(tmp_path):
    import hashlib

    data = bytes(range(256)) * 5000
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    assert model_hash(path) == hashlib.sha256(data).hexdigest()[:10]
