"""Pre-training the shapes world's text encoder to say where each object is, from captions alone.

In "a red circle right of a blue square" the UNet's cross-attention at the right of the image must
read "red" and "circle" and not "blue" and "square". One attention read can do that only if those
tokens already carry which place they describe, and the place depends on the relation word and on
which side of it they stand. Learned from the diffusion loss alone, a from-scratch encoder is slow
to put that in its tokens: a built-in model trained that way drew every one-object prompt right but
only about a quarter of two-object scenes, mostly with one object's colour or shape leaking into the
other (MODEL_CARD.md, run C).

The objective here asks for exactly that read. One learned query per canvas position attends once
over the encoder's tokens, as a cross-attention query of the UNet would, and must name the shape,
colour and size of the object at its place, or that there is none; one more query names the
background. The grammar gives every caption's scene, so no image is involved: 1,000 steps take
about 2 minutes on a 2-core CPU. The LDM then starts from the result and keeps it frozen
(``ldm.conditioner.init``, ``lr_scale: 0``). ``--probe`` trains only the queries over a given
model's encoder, which measures how much of the layout that encoder's tokens carry.

    python -m latent_diffusion.training.shapes_text runs/shapes/text-encoder.safetensors
    python -m latent_diffusion.training.shapes_text --probe latent_diffusion/assets/shapes-ldm.safetensors
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.config import BERTTextConfig
from latent_diffusion.data.shapes import (
    BACKGROUNDS, COLOURS, PHRASINGS, POSITIONS, SHAPES, SIZES, Scene, caption_for, sample_scene,
)
from latent_diffusion.models.text_encoders import BERTTextEncoder
from latent_diffusion.models.tokenizer import CLIPTokenizer
from latent_diffusion.training.config import OptimConfig
from latent_diffusion.training.loop import adamw, learning_rate, set_learning_rate

log = logging.getLogger(__name__)

TEXT_ENCODER_METADATA_KEY = "ldm.text_encoder"


def layout_targets(scene: Scene) -> torch.Tensor:
    """``[len(POSITIONS) + 1, 3]`` class ids: per position (shape, colour, size), 0 for "nothing here"
    and 1 + the word's index otherwise; the last row holds the background id (padded with zeros)."""
    targets = torch.zeros(len(POSITIONS) + 1, 3, dtype=torch.long)
    for obj in scene.objects:
        row = POSITIONS.index(obj.position)
        targets[row] = torch.tensor([1 + SHAPES.index(obj.shape), 1 + COLOURS.index(obj.colour), 1 + SIZES.index(obj.size)])
    targets[-1, 0] = BACKGROUNDS.index(scene.background)
    return targets


class LayoutProbe(nn.Module):
    """One attention read per canvas position (plus one for the background) over the text tokens."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(len(POSITIONS) + 1, width) / math.sqrt(width))
        self.to_k = nn.Linear(width, width, bias=False)
        self.to_v = nn.Linear(width, width, bias=False)
        self.shape = nn.Linear(width, len(SHAPES) + 1)
        self.colour = nn.Linear(width, len(COLOURS) + 1)
        self.size = nn.Linear(width, len(SIZES) + 1)
        self.background = nn.Linear(width, len(BACKGROUNDS))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Logits: shape, colour, size ``[B, positions, classes]`` and background ``[B, 3]``."""
        weights = torch.softmax(self.queries @ self.to_k(tokens).transpose(1, 2) / math.sqrt(tokens.shape[-1]), dim=-1)
        read = weights @ self.to_v(tokens)
        places, background = read[:, :-1], read[:, -1]
        return self.shape(places), self.colour(places), self.size(places), self.background(background)


def probe_loss(logits: Sequence[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over every read, per caption whether every read is right)."""
    shape, colour, size, background = logits
    places = targets[:, :-1]
    pairs = [(shape, places[..., 0]), (colour, places[..., 1]), (size, places[..., 2]), (background, targets[:, -1, 0])]
    loss = sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1)) for lg, tg in pairs)
    right = torch.stack([(lg.argmax(-1) == tg).reshape(len(tg), -1).all(1) for lg, tg in pairs]).all(0)
    return loss, right


@dataclass(frozen=True)
class CaptionSet:
    tokens: torch.Tensor  # [N, max_seq_len]
    targets: torch.Tensor  # [N, positions + 1, 3]
    two_objects: torch.Tensor  # [N] bool


def caption_set(count: int, tokenizer: CLIPTokenizer, *, seed: int, split: str = "train",
                two_object_probability: float = 0.7) -> CaptionSet:
    """``count`` captions of random scenes (every phrasing), tokenised, with their layout targets."""
    rng = np.random.default_rng(seed)
    captions, targets, two = [], [], []
    for _ in range(count):
        scene = sample_scene(rng, split, two_object_probability)
        captions.append(caption_for(scene, PHRASINGS[rng.integers(len(PHRASINGS))]))
        targets.append(layout_targets(scene))
        two.append(len(scene.objects) == 2)
    return CaptionSet(tokenizer(captions), torch.stack(targets), torch.tensor(two))


@torch.no_grad()
def evaluate(encoder: nn.Module, probe: LayoutProbe, data: CaptionSet) -> dict[str, float]:
    """Fraction of captions whose every read is right: all, one-object and two-object captions."""
    right = torch.cat([probe_loss(probe(encoder(tokens)), targets)[1]
                       for tokens, targets in zip(data.tokens.split(512), data.targets.split(512))])
    return {"all": right.float().mean().item(), "one object": right[~data.two_objects].float().mean().item(),
            "two objects": right[data.two_objects].float().mean().item()}


def pretrain(encoder: BERTTextEncoder, tokenizer: CLIPTokenizer, *, steps: int = 1000, batch_size: int = 128,
             lr: float = 1e-3, seed: int = 0, train_encoder: bool = True, pool: int = 50_000) -> tuple[LayoutProbe, dict]:
    """Train ``encoder`` (or, with ``train_encoder=False``, only the probe) on the layout read.

    Returns the probe and the held-out caption accuracy (fresh scenes, including the held-out
    colour-shape pairs, which the training captions never contain).
    """
    torch.manual_seed(seed)
    probe = LayoutProbe(encoder.config.n_embed)
    train = caption_set(pool, tokenizer, seed=seed)
    encoder.train(train_encoder).requires_grad_(train_encoder)
    # Linear warm-up over the first 5% of the steps, then cosine decay to a tenth.
    optim = OptimConfig(lr=lr, warmup_steps=max(1, steps // 20), schedule="cosine", min_lr_ratio=0.1)
    optimizer = adamw([*probe.parameters(), *(encoder.parameters() if train_encoder else [])], optim)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        set_learning_rate(optimizer, learning_rate(step, optim, steps))
        index = torch.randint(len(train.tokens), (batch_size,), generator=generator)
        loss, right = probe_loss(probe(encoder(train.tokens[index])), train.targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 250 == 0 or step + 1 == steps:
            log.info("step %d: loss %.4f, captions read right %.3f", step + 1, loss.item(), right.float().mean().item())
    encoder.eval().requires_grad_(False)
    probe.eval()
    fresh = caption_set(2000, tokenizer, seed=seed + 1, split="all")
    return probe, evaluate(encoder, probe, fresh)


def save_text_encoder(encoder: BERTTextEncoder, path: str | Path, figures: dict) -> Path:
    """The encoder's state dict (BERTEmbedder key names) with its config and figures in the metadata."""
    from latent_diffusion.checkpoints.io import save_safetensors

    config = encoder.config
    metadata = {TEXT_ENCODER_METADATA_KEY: json.dumps({"n_embed": config.n_embed, "n_layer": config.n_layer,
                                                        "max_seq_len": config.max_seq_len, "vocab_size": config.vocab_size}),
                "layout_read_accuracy": json.dumps(figures)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.contiguous() for k, v in encoder.state_dict().items()}, path, metadata)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", help="where to write the pre-trained encoder (.safetensors)")
    parser.add_argument("--probe", metavar="CHECKPOINT",
                        help="instead: freeze the text encoder of this LDM single file and train only the probe, "
                             "to measure how much of the layout its tokens carry")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-embed", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if (args.output is None) == (args.probe is None):
        parser.error("give either OUTPUT or --probe CHECKPOINT")
    if args.probe:
        from latent_diffusion.checkpoints.load import load_checkpoint

        encoder = load_checkpoint(args.probe).model.cond_stage_model.float()
        if not isinstance(encoder, BERTTextEncoder):
            parser.error(f"{args.probe} has no BERTEmbedder text encoder")
        tokenizer = CLIPTokenizer(pad_with_eos=True, context_length=encoder.config.max_seq_len)
        _, figures = pretrain(encoder, tokenizer, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              seed=args.seed, train_encoder=False)
        print(json.dumps({"probe of": args.probe, "captions read right": figures}))
        return
    from latent_diffusion.training.ldm_model import CLIP_VOCAB_SIZE

    encoder = BERTTextEncoder(BERTTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_seq_len=args.max_seq_len,
                                             n_embed=args.n_embed, n_layer=args.n_layer))
    tokenizer = CLIPTokenizer(pad_with_eos=True, context_length=args.max_seq_len)
    _, figures = pretrain(encoder, tokenizer, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    path = save_text_encoder(encoder, args.output, figures)
    print(json.dumps({"written": str(path), "captions read right": figures}))


if __name__ == "__main__":
    main()
