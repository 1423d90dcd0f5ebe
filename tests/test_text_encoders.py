"""Condition encoders against transformers/diffusers on the same random weights.

The checkpoint-layout state dicts of our modules go through diffusers' own single-file converters
(exactly how diffusers loads an SD 1/2 ``.ckpt``), so the key names are checked as well as the maths.
"""
import dataclasses

import pytest
import torch
from conftest import assert_close_to_reference

from latent_diffusion.config import (
    CLIP_L, LDM_TEXT2IMG256, OPENCLIP_H, BERTTextConfig, ClassEmbedderConfig, CLIPTextConfig,
)
from latent_diffusion.models.text_encoders import (
    BERTTextEncoder, ClassEmbedder, CLIPTextEncoder, build_condition_encoder,
)
from latent_diffusion.models.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

TINY_OPENAI = CLIPTextConfig(layout="openai", width=64, layers=3, heads=4, activation="quick_gelu")
TINY_OPENCLIP = CLIPTextConfig(
    layout="openclip", width=64, layers=3, heads=4, activation="gelu", skip_last_layers=1, pad_with_eos=False
)
TINY_BERT = BERTTextConfig(vocab_size=120, max_seq_len=77, n_embed=64, n_layer=2, heads=4, dim_head=16, ff_mult=4)
PROMPTS = ["a photo of an astronaut riding a horse on mars", "Tom & Jerry, 1999 (masterpiece)"]


def _tokens(config: CLIPTextConfig) -> torch.Tensor:
    return CLIPTokenizer(pad_with_eos=config.pad_with_eos)(PROMPTS)


def _randomize_norms(module: torch.nn.Module) -> None:
    # LayerNorms start as identity; random affine parameters make a swapped key visible.
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.LayerNorm):
                sub.weight.normal_(1.0, 0.2)
                sub.bias.normal_(0.0, 0.2)


def _checkpoint(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"cond_stage_model.{k}": v for k, v in module.state_dict().items()}


def _hf_clip_config(config: CLIPTextConfig, layers: int, **extra):
    return transformers.CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=4 * config.width,
        num_hidden_layers=layers, num_attention_heads=config.heads, max_position_embeddings=config.context_length,
        hidden_act=config.activation, layer_norm_eps=1e-5, attention_dropout=0.0,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407 if config.pad_with_eos else 0, **extra,
    )


def _sd1_reference(ours: CLIPTextEncoder):
    """transformers' CLIPTextModel loaded through diffusers' ``convert_ldm_clip_checkpoint``."""
    reference = transformers.CLIPTextModel(_hf_clip_config(ours.config, ours.config.layers)).eval()
    converted = single_file_utils.convert_ldm_clip_checkpoint(_checkpoint(ours))
    if not hasattr(reference, "text_model"):  # transformers >= 5.6 dropped the text_model level
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    missing, unexpected = reference.load_state_dict(converted, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return reference


def _sd2_reference(ours: CLIPTextEncoder, layers: int):
    """transformers' CLIPTextModelWithProjection loaded through diffusers' ``convert_open_clip_checkpoint``.

    diffusers drops ``resblocks.23`` and ``text_projection`` for SD 2, so ``layers`` is 23 there.
    """
    config = _hf_clip_config(ours.config, layers, projection_dim=ours.config.width)
    reference = transformers.CLIPTextModelWithProjection(config).eval()
    checkpoint = _checkpoint(ours)
    converted = single_file_utils.convert_open_clip_checkpoint(reference, checkpoint)
    converted["text_projection.weight"] = ours.model.text_projection.detach().T.contiguous()
    missing, unexpected = reference.load_state_dict(converted, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return reference


def _final_layer_norm(reference):
    return getattr(reference, "text_model", reference).final_layer_norm


def _build(config, seed=0):
    torch.manual_seed(seed)
    encoder = build_condition_encoder(config).eval()
    _randomize_norms(encoder)
    return encoder


# --- key layout --------------------------------------------------------------------------------


def test_clip_l_keys_and_parameter_count():
    with torch.device("meta"):
        encoder = CLIPTextEncoder(CLIP_L)
    keys = encoder.state_dict().keys()
    assert len(keys) == 196
    assert sum(p.numel() for p in encoder.parameters()) == 123_060_480
    expected = {
        "transformer.text_model.embeddings.token_embedding.weight",
        "transformer.text_model.embeddings.position_embedding.weight",
        "transformer.text_model.final_layer_norm.weight",
        "transformer.text_model.final_layer_norm.bias",
    }
    for n in range(12):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"transformer.text_model.encoder.layers.{n}.{name}.{p}" for p in ("weight", "bias")}
    assert set(keys) == expected


def test_openclip_h_keys_and_parameter_count():
    with torch.device("meta"):
        encoder = CLIPTextEncoder(OPENCLIP_H)
        reference = transformers.CLIPTextModel(_hf_clip_config(OPENCLIP_H, 23))
    keys = set(encoder.state_dict())
    per_layer = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                 "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "mlp.c_proj.weight", "mlp.c_proj.bias")
    expected = {"model.token_embedding.weight", "model.positional_embedding", "model.ln_final.weight",
                "model.ln_final.bias", "model.text_projection", "model.logit_scale"}
    expected |= {f"model.transformer.resblocks.{n}.{name}" for n in range(24) for name in per_layer}
    assert keys == expected
    # What SD 2 runs (23 layers, no projection) is what diffusers builds for it.
    used = sum(p.numel() for name, p in encoder.named_parameters()
               if ".resblocks.23." not in name and name not in ("model.text_projection", "model.logit_scale"))
    assert used == sum(p.numel() for p in reference.parameters()) == 340_387_840


def test_bert_keys_and_parameter_count_match_diffusers_ldmbert():
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    config = LDM_TEXT2IMG256.conditioner
    with torch.device("meta"):
        encoder = BERTTextEncoder(config)
        reference = LDMBertModel(_ldmbert_config(LDMBertConfig, config))
    assert set(_bert_to_ldmbert(encoder.state_dict())) == set(reference.state_dict())
    assert sum(p.numel() for p in encoder.parameters()) == sum(p.numel() for p in reference.parameters())


TINY_CLASSES = ClassEmbedderConfig(n_classes=10, embed_dim=8)


@pytest.mark.parametrize("tiny", [TINY_OPENAI, TINY_OPENCLIP, TINY_BERT, TINY_CLASSES])
def test_meta_construction_then_assign_load(tiny):
    source = _build(tiny)
    with torch.device("meta"):
        target = build_condition_encoder(tiny)
    target.load_state_dict(source.state_dict(), strict=True, assign=True)
    for name, tensor in target.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name]), name


@pytest.mark.parametrize("stored", [None, torch.arange(77)[None], torch.arange(77, dtype=torch.float32)[None] - 1e-3])
def test_sd1_checkpoint_position_ids_are_accepted_and_ignored(stored):
    source = _build(TINY_OPENAI)
    state = dict(source.state_dict())
    if stored is not None:
        state["transformer.text_model.embeddings.position_ids"] = stored
    target = CLIPTextEncoder(TINY_OPENAI).eval()
    target.load_state_dict(state, strict=True)
    tokens = _tokens(TINY_OPENAI)
    with torch.no_grad():
        assert torch.equal(target(tokens), source(tokens))


# --- numerics vs transformers ------------------------------------------------------------------


@torch.no_grad()
def test_sd1_clip_matches_transformers():
    ours = _build(TINY_OPENAI)
    reference = _sd1_reference(ours)
    tokens = _tokens(TINY_OPENAI)
    expected = reference(input_ids=tokens, output_hidden_states=True)
    encoding = ours.encode(tokens)
    assert_close_to_reference(ours(tokens), expected.last_hidden_state)
    assert_close_to_reference(encoding.hidden_states, expected.last_hidden_state)
    assert_close_to_reference(encoding.pooled, expected.pooler_output)
    assert encoding.projected is None
    # A1111 "clip skip 2" on SD 1: the penultimate layer's output through the final LayerNorm.
    final_norm = _final_layer_norm(reference)
    penultimate = final_norm(expected.hidden_states[-2])
    assert_close_to_reference(ours(tokens, clip_skip=2), penultimate)
    assert_close_to_reference(ours.encode(tokens, clip_skip=2).hidden_states, penultimate)
    assert_close_to_reference(ours.encode(tokens, clip_skip=2).pooled, expected.pooler_output)


@torch.no_grad()
def test_sd2_openclip_matches_transformers():
    ours = _build(TINY_OPENCLIP)
    reference = _sd2_reference(ours, TINY_OPENCLIP.layers)
    tokens = _tokens(TINY_OPENCLIP)
    assert tokens[0, -1] == 0  # OpenCLIP pads with 0
    expected = reference(input_ids=tokens, output_hidden_states=True)
    # FrozenOpenCLIPEmbedder(layer="penultimate"): all but the last block, then ln_final.
    penultimate = reference.text_model.final_layer_norm(expected.hidden_states[-2])
    assert_close_to_reference(ours(tokens), penultimate)
    encoding = ours.encode(tokens)
    assert_close_to_reference(encoding.hidden_states, penultimate)
    assert_close_to_reference(encoding.projected, expected.text_embeds)
    assert_close_to_reference(ours(tokens, clip_skip=1), expected.last_hidden_state)


@torch.no_grad()
def test_sd2_openclip_with_diffusers_23_layer_model():
    """diffusers runs SD 2's text encoder as a CLIPTextModel without the last block."""
    config = dataclasses.replace(TINY_OPENCLIP, layers=24)
    ours = _build(config)
    reference = transformers.CLIPTextModel(_hf_clip_config(config, 23)).eval()
    converted = single_file_utils.convert_open_clip_checkpoint(reference, _checkpoint(ours))
    if not hasattr(reference, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    missing, unexpected = reference.load_state_dict(converted, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    tokens = _tokens(config)
    assert_close_to_reference(ours(tokens), reference(input_ids=tokens).last_hidden_state)


# --- BERT (LDM paper) --------------------------------------------------------------------------


def _ldmbert_config(config_class, config: BERTTextConfig):
    return config_class(
        vocab_size=config.vocab_size, max_position_embeddings=config.max_seq_len, encoder_layers=config.n_layer,
        encoder_ffn_dim=config.ff_mult * config.n_embed, encoder_attention_heads=config.heads,
        head_dim=config.dim_head, d_model=config.n_embed, dropout=0.0, activation_function="gelu",
    )


def _bert_to_ldmbert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CompVis BERTEmbedder keys -> diffusers LDMBertModel keys (the mapping of diffusers' converter)."""
    renames = {
        "transformer.token_emb.": "model.embed_tokens.", "transformer.pos_emb.emb.": "model.embed_positions.",
        "transformer.norm.": "model.layer_norm.", "transformer.to_logits.": "to_logits.",
    }
    sub_layer = {"0.": ("self_attn_layer_norm.", "final_layer_norm."), "1.to_q.": "self_attn.q_proj.",
                 "1.to_k.": "self_attn.k_proj.", "1.to_v.": "self_attn.v_proj.", "1.to_out.": "self_attn.out_proj.",
                 "1.net.0.0.": "fc1.", "1.net.2.": "fc2."}
    out = {}
    for key, value in state.items():
        for old, new in renames.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            index, rest = key.removeprefix("transformer.attn_layers.layers.").split(".", 1)
            layer, is_ff = divmod(int(index), 2)
            for old, new in sub_layer.items():
                if rest.startswith(old):
                    new = new[is_ff] if isinstance(new, tuple) else new
                    out[f"model.layers.{layer}.{new}{rest[len(old):]}"] = value
                    break
            else:
                raise KeyError(key)
    return out


@torch.no_grad()
def test_bert_matches_diffusers_ldmbert():
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    ours = _build(TINY_BERT)
    reference = LDMBertModel(_ldmbert_config(LDMBertConfig, TINY_BERT)).eval()
    reference.load_state_dict(_bert_to_ldmbert(ours.state_dict()), strict=True)
    tokens = torch.randint(0, TINY_BERT.vocab_size, (2, 77))
    got = ours(tokens)
    assert got.shape == (2, 77, TINY_BERT.n_embed)
    assert_close_to_reference(got, reference(input_ids=tokens).last_hidden_state)


# --- class embedder and errors -----------------------------------------------------------------


def test_class_embedder_is_compvis_lookup():
    embedder = ClassEmbedder(ClassEmbedderConfig(n_classes=10, embed_dim=8))
    assert list(embedder.state_dict()) == ["embedding.weight"]
    ids = torch.tensor([3, 0, 9])
    out = embedder(ids)
    assert out.shape == (3, 1, 8)
    assert torch.equal(out[:, 0], embedder.embedding.weight[ids])


def test_bad_inputs_are_clear_errors():
    clip = CLIPTextEncoder(TINY_OPENAI)
    with pytest.raises(ValueError, match="token ids"):
        clip(torch.zeros(77, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed"):
        clip(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="must lie in"):
        clip(torch.full((1, 77), 49408))
    with pytest.raises(ValueError, match="clip_skip"):
        clip(torch.zeros(1, 77, dtype=torch.long), clip_skip=0)
    with pytest.raises(ValueError, match="clip_skip"):
        clip(torch.zeros(1, 77, dtype=torch.long), clip_skip=4)
    with pytest.raises(ValueError, match="class ids"):
        ClassEmbedder(ClassEmbedderConfig(n_classes=10, embed_dim=8))(torch.tensor([[1]]))
    with pytest.raises(ValueError, match="class ids"):
        ClassEmbedder(ClassEmbedderConfig(n_classes=10, embed_dim=8))(torch.tensor([10]))
    with pytest.raises(ValueError, match="skip_last_layers"):
        CLIPTextEncoder(dataclasses.replace(TINY_OPENAI, skip_last_layers=3))
    with pytest.raises(ValueError, match="layout"):
        CLIPTextEncoder(dataclasses.replace(TINY_OPENAI, layout="t5"))


# --- full size ---------------------------------------------------------------------------------


@pytest.mark.slow
@torch.no_grad()
def test_full_size_clip_l_matches_transformers():
    ours = _build(CLIP_L)
    reference = _sd1_reference(ours)
    tokens = _tokens(CLIP_L)
    expected = reference(input_ids=tokens, output_hidden_states=True)
    assert_close_to_reference(ours(tokens), expected.last_hidden_state)
    final_norm = _final_layer_norm(reference)
    assert_close_to_reference(ours(tokens, clip_skip=2), final_norm(expected.hidden_states[-2]))


@pytest.mark.slow
@torch.no_grad()
def test_full_size_openclip_h_matches_diffusers_sd2_text_encoder():
    ours = _build(OPENCLIP_H)
    reference = transformers.CLIPTextModel(_hf_clip_config(OPENCLIP_H, 23)).eval()
    converted = single_file_utils.convert_open_clip_checkpoint(reference, _checkpoint(ours))
    if not hasattr(reference, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    missing, unexpected = reference.load_state_dict(converted, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    tokens = _tokens(OPENCLIP_H)
    assert_close_to_reference(ours(tokens), reference(input_ids=tokens).last_hidden_state)
