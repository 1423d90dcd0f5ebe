"""Conditioning encoders with the state-dict layout of the released checkpoints.

Every module's ``state_dict()`` keys equal the keys under ``cond_stage_model.`` in the original
files, so those load with ``strict=True`` and no renaming:

* :class:`CLIPTextEncoder`, layout "openai": SD 1.x ``FrozenCLIPEmbedder`` (a transformers
  ``CLIPTextModel`` under ``transformer.text_model.``);
* :class:`CLIPTextEncoder`, layout "openclip": SD 2.x ``FrozenOpenCLIPEmbedder`` (an OpenCLIP
  text tower under ``model.``);
* :class:`BERTTextEncoder`: the latent-diffusion paper's ``BERTEmbedder`` (the x-transformers
  ``TransformerWrapper(Encoder)`` vendored in CompVis ``ldm/modules/x_transformer.py``);
* :class:`ClassEmbedder`: CompVis' class-label embedding for class-conditional models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.config import (
    BERTTextConfig, ClassEmbedderConfig, CLIPTextConfig, ConditionerConfig, GeneralConditionerConfig,
)
from latent_diffusion.nn.attention import attention

# SD 1 files written by transformers < 4.31 also store this buffer. It is always arange(77), and some
# merged checkpoints carry it as float with rounding damage, so positions are computed instead and
# the stored copy is dropped at load time (files with and without it both load strictly).
_STORED_POSITION_IDS = "position_ids"


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


def _multi_head_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool
) -> torch.Tensor:
    """Scaled dot-product attention over ``[B, N, heads * d]`` projections; returns ``[B, N, heads * d]``."""
    batch, tokens, width = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, t.shape[1], heads, -1).transpose(1, 2)

    out = attention(split(q), split(k), split(v), causal=causal)
    return out.transpose(1, 2).reshape(batch, tokens, -1)


def _check_token_ids(tokens: torch.Tensor, vocab_size: int, max_length: int, who: str) -> None:
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{who}: expected integer token ids [batch, tokens], got {tuple(tokens.shape)} {tokens.dtype}")
    if tokens.shape[1] > max_length:
        raise ValueError(f"{who}: {tokens.shape[1]} tokens exceed the {max_length} positions of the model")
    if tokens.device.type != "meta" and tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(
            f"{who}: token ids must lie in [0, {vocab_size}), got [{tokens.min().item()}, {tokens.max().item()}]"
        )


# ---------------------------------------------------------------------------------------------
# CLIP text transformer, transformers layout (SD 1.x)


class _OpenAIAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _multi_head_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True)
        return self.out_proj(out)


class _OpenAIMLP(nn.Module):
    def __init__(self, width: int, activation: str):
        super().__init__()
        self.activation = _ACTIVATIONS[activation]
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class _OpenAILayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = _OpenAIAttention(config.width, config.heads)
        self.layer_norm1 = nn.LayerNorm(config.width)
        self.mlp = _OpenAIMLP(config.width, config.activation)
        self.layer_norm2 = nn.LayerNorm(config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _OpenAIEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.context_length, config.width)
        self.register_load_state_dict_pre_hook(_drop_stored_position_ids)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens) + self.position_embedding.weight[: tokens.shape[1]]


def _token_vectors(table: nn.Embedding, tokens: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """Token vectors where ids past the vocabulary index ``extra`` (textual-inversion embeddings)."""
    vocab = table.num_embeddings
    beyond = tokens >= vocab
    vectors = table(torch.where(beyond, 0, tokens))
    extra = extra.to(vectors.device, vectors.dtype)
    return torch.where(beyond[..., None], extra[torch.where(beyond, tokens - vocab, 0)], vectors)


def _drop_stored_position_ids(module, state_dict, prefix, *args) -> None:
    state_dict.pop(prefix + _STORED_POSITION_IDS, None)


class _OpenAIEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(_OpenAILayer(config) for _ in range(config.layers))


class _OpenAITextModel(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = _OpenAIEmbeddings(config)
        self.encoder = _OpenAIEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.layers

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.final_layer_norm

    def embed(self, tokens: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        if extra is None:
            return self.embeddings(tokens)
        table = self.embeddings
        return _token_vectors(table.token_embedding, tokens, extra) + table.position_embedding.weight[: tokens.shape[1]]


class _OpenAITransformer(nn.Module):
    """The ``CLIPTextModel`` level of ``FrozenCLIPEmbedder.transformer`` (keys ``text_model.*``)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.text_model = _OpenAITextModel(config)


# ---------------------------------------------------------------------------------------------
# CLIP text transformer, OpenCLIP layout (SD 2.x)


class _OpenCLIPAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameter layout: one packed q/k/v projection."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(_multi_head_attention(q, k, v, self.heads, causal=True))


class _OpenCLIPMLP(nn.Module):
    def __init__(self, width: int, activation: str):
        super().__init__()
        self.activation = _ACTIVATIONS[activation]
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.activation(self.c_fc(x)))


class _OpenCLIPBlock(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width)
        self.attn = _OpenCLIPAttention(config.width, config.heads)
        self.ln_2 = nn.LayerNorm(config.width)
        self.mlp = _OpenCLIPMLP(config.width, config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _OpenCLIPTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(_OpenCLIPBlock(config) for _ in range(config.layers))


class _OpenCLIPTextModel(nn.Module):
    """The text tower of ``open_clip.CLIP`` as ``FrozenOpenCLIPEmbedder.model`` keeps it."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = _OpenCLIPTransformer(config)
        self.ln_final = nn.LayerNorm(config.width)
        # OpenCLIP's joint embedding width equals the text width for ViT-H/14 (and bigG).
        self.text_projection = nn.Parameter(torch.empty(config.width, config.width))
        self.logit_scale = nn.Parameter(torch.empty(()))
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=config.width**-0.5)
        nn.init.constant_(self.logit_scale, math.log(1 / 0.07))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.ln_final

    def embed(self, tokens: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        vectors = self.token_embedding(tokens) if extra is None else _token_vectors(self.token_embedding, tokens, extra)
        return vectors + self.positional_embedding[: tokens.shape[1]]


@dataclass(frozen=True)
class TextEncoding:
    """What a CLIP text encoder produces for one batch of token ids."""

    hidden_states: torch.Tensor  # [B, N, width]: the cross-attention context
    pooled: torch.Tensor  # [B, width]: final-layer, final-LayerNorm output at the end token
    projected: torch.Tensor | None  # [B, width]: ``pooled @ text_projection`` (OpenCLIP layout only)


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer (causal self-attention) in the SD 1.x or SD 2.x checkpoint layout."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        if config.layout not in ("openai", "openclip"):
            raise ValueError(f"CLIPTextConfig.layout must be 'openai' or 'openclip', got {config.layout!r}")
        if config.activation not in _ACTIVATIONS:
            raise ValueError(
                f"CLIPTextConfig.activation must be one of {sorted(_ACTIVATIONS)}, got {config.activation!r}"
            )
        if config.width % config.heads:
            raise ValueError(f"CLIPTextConfig: width {config.width} is not divisible by heads {config.heads}")
        if not 0 <= config.skip_last_layers < config.layers:
            raise ValueError(
                f"CLIPTextConfig.skip_last_layers must lie in [0, {config.layers}), got {config.skip_last_layers}"
            )
        self.config = config
        if config.layout == "openai":
            self.transformer = _OpenAITransformer(config)
        else:
            self.model = _OpenCLIPTextModel(config)

    @property
    def _text_model(self) -> _OpenAITextModel | _OpenCLIPTextModel:
        return self.transformer.text_model if self.config.layout == "openai" else self.model

    def _layers_to_run(self, clip_skip: int | None) -> int:
        if clip_skip is None:
            return self.config.layers - self.config.skip_last_layers
        if not 1 <= clip_skip <= self.config.layers:
            raise ValueError(f"clip_skip must lie in [1, {self.config.layers}], got {clip_skip}")
        return self.config.layers - (clip_skip - 1)

    def _context(self, x: torch.Tensor) -> torch.Tensor:
        return self._text_model.final_norm(x) if self.config.normalize_context else x

    def encode(self, tokens: torch.Tensor, clip_skip: int | None = None,
               extra_vectors: torch.Tensor | None = None) -> TextEncoding:
        """Hidden states (as :meth:`forward`) plus the pooled end-token features of the last layer."""
        body = self._text_model
        _check_token_ids(tokens, self._vocabulary(extra_vectors), self.config.context_length, "CLIPTextEncoder")
        layers_to_run = self._layers_to_run(clip_skip)
        x = body.embed(tokens, extra_vectors)
        context = None
        for index, block in enumerate(body.blocks):
            if index == layers_to_run:
                context = self._context(x)
            x = block(x)
        final = body.final_norm(x)
        context = self._context(x) if context is None else context
        # The end token has the largest id, so argmax finds its first occurrence (CLIP's rule);
        # embedding vectors' ids lie past the vocabulary and are not candidates.
        ends = tokens if extra_vectors is None else torch.where(tokens >= self.config.vocab_size, -1, tokens)
        pooled = final[torch.arange(final.shape[0], device=final.device), ends.argmax(dim=-1)]
        projected = pooled @ body.text_projection if self.config.layout == "openclip" else None
        return TextEncoding(hidden_states=context, pooled=pooled, projected=projected)

    def _vocabulary(self, extra_vectors: torch.Tensor | None) -> int:
        return self.config.vocab_size + (0 if extra_vectors is None else extra_vectors.shape[0])

    def forward(self, tokens: torch.Tensor, clip_skip: int | None = None,
                extra_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-attention context ``[B, N, width]``: the last layer run, through the final LayerNorm.

        ``clip_skip=None`` follows ``config.skip_last_layers`` (0 for SD 1; 1 for SD 2, matching
        ``FrozenOpenCLIPEmbedder(layer="penultimate")``, which also applies ``ln_final``).
        ``clip_skip=k`` is A1111's "Clip skip" setting: drop the last ``k - 1`` layers. Without
        ``config.normalize_context`` (SDXL) the hidden states come without the final LayerNorm.
        ``extra_vectors`` are the token vectors of ids ``vocab_size`` and up (textual inversion).
        """
        body = self._text_model
        _check_token_ids(tokens, self._vocabulary(extra_vectors), self.config.context_length, "CLIPTextEncoder")
        x = body.embed(tokens, extra_vectors)
        for block in body.blocks[: self._layers_to_run(clip_skip)]:
            x = block(x)
        return self._context(x)


# ---------------------------------------------------------------------------------------------
# The latent-diffusion paper's BERTEmbedder (x-transformers layout)


class _XAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No padding mask: BERTEmbedder lets every token attend to the [PAD] positions too.
        out = _multi_head_attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads, causal=False)
        return self.to_out(out)


class _XFeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        # Index layout of x-transformers: net.0 = (Linear, GELU), net.1 = Dropout, net.2 = Linear.
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU()), nn.Dropout(0.0), nn.Linear(dim * mult, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _XAttentionLayers(nn.Module):
    def __init__(self, config: BERTTextConfig):
        super().__init__()
        # x-transformers keeps [norm, block, residual] per sub-layer; the residual has no
        # parameters, so [norm, block] gives the same keys.
        pairs = []
        for _ in range(config.n_layer):
            attention = _XAttention(config.n_embed, config.heads, config.dim_head)
            pairs.append(nn.ModuleList([nn.LayerNorm(config.n_embed), attention]))
            pairs.append(nn.ModuleList([nn.LayerNorm(config.n_embed), _XFeedForward(config.n_embed, config.ff_mult)]))
        self.layers = nn.ModuleList(pairs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block in self.layers:
            x = x + block(norm(x))
        return x


class _XPositionalEmbedding(nn.Module):
    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)


class _XTransformerWrapper(nn.Module):
    def __init__(self, config: BERTTextConfig):
        super().__init__()
        self.token_emb = nn.Embedding(config.vocab_size, config.n_embed)
        self.pos_emb = _XPositionalEmbedding(config.n_embed, config.max_seq_len)
        self.attn_layers = _XAttentionLayers(config)
        self.norm = nn.LayerNorm(config.n_embed)
        # Unused for conditioning, but present in the released checkpoints.
        self.to_logits = nn.Linear(config.n_embed, config.vocab_size)


class BERTTextEncoder(nn.Module):
    """``BERTEmbedder``: token ids ``[B, N]`` -> embeddings ``[B, N, n_embed]`` (pre-norm encoder, final LayerNorm)."""

    def __init__(self, config: BERTTextConfig):
        super().__init__()
        self.config = config
        self.transformer = _XTransformerWrapper(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _check_token_ids(tokens, self.config.vocab_size, self.config.max_seq_len, "BERTTextEncoder")
        wrapper = self.transformer
        x = wrapper.token_emb(tokens) + wrapper.pos_emb.emb.weight[: tokens.shape[1]]
        return wrapper.norm(wrapper.attn_layers(x))


class ClassEmbedder(nn.Module):
    """CompVis ``ClassEmbedder``: class ids ``[B]`` -> one context token ``[B, 1, embed_dim]``."""

    def __init__(self, config: ClassEmbedderConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.n_classes, config.embed_dim)

    def forward(self, class_ids: torch.Tensor) -> torch.Tensor:
        if class_ids.dim() != 1 or class_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"ClassEmbedder: expected integer class ids [batch], got {tuple(class_ids.shape)} {class_ids.dtype}"
            )
        if class_ids.device.type != "meta" and class_ids.numel():
            low, high = class_ids.min().item(), class_ids.max().item()
            if low < 0 or high >= self.config.n_classes:
                raise ValueError(
                    f"ClassEmbedder: class ids must lie in [0, {self.config.n_classes}), got [{low}, {high}]"
                )
        return self.embedding(class_ids)[:, None, :]


def build_condition_encoder(config: ConditionerConfig) -> nn.Module | None:
    """The encoder module for a ``ModelSpec.conditioner`` config (None for unconditional models)."""
    if config is None:
        return None
    if isinstance(config, CLIPTextConfig):
        return CLIPTextEncoder(config)
    if isinstance(config, BERTTextConfig):
        return BERTTextEncoder(config)
    if isinstance(config, ClassEmbedderConfig):
        return ClassEmbedder(config)
    if isinstance(config, GeneralConditionerConfig):
        from latent_diffusion.models.conditioner import GeneralConditioner

        return GeneralConditioner(config)
    raise ValueError(f"no condition encoder for config type {type(config).__name__}")
