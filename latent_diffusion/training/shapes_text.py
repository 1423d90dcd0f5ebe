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
background. Captions as people write them often leave the places unsaid ("two red circles", "a
blue star and a green box"): for those the place reads are not scored, and one query per object
of the caption, in its order, names what the caption says of it (size or "unsaid"), with one more
for how many objects there are. Every caption comes with its scene, so no image is involved:
3,000 steps take about 8 minutes on a 2-core CPU. The LDM then starts from the result and keeps it frozen
(``ldm.conditioner.init``, ``lr_scale: 0``). ``--probe`` trains only the queries over a given
model's encoder, which measures how much of the layout that encoder's tokens carry.

``--init`` goes on training the encoder inside an LDM file and writes a copy of the file with it, for
a UNet fine-tune; ``--rule-out-places`` also scores the places a "beside" caption leaves empty.

    python -m latent_diffusion.training.shapes_text runs/shapes/text-encoder.safetensors
    python -m latent_diffusion.training.shapes_text --probe latent_diffusion/assets/shapes-ldm.safetensors
    python -m latent_diffusion.training.shapes_text OUT.safetensors --init LDM.safetensors --rule-out-places --steps 1500 --lr 2e-4
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.config import BERTTextConfig
from latent_diffusion.data.shapes import (
    BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, THREE_OBJECT_LAYOUTS, Scene, ShapesDataset,
)
from latent_diffusion.data.shapes_speech import stated_positions, read_description
from latent_diffusion.models.text_encoders import BERTTextEncoder
from latent_diffusion.models.tokenizer import CLIPTokenizer
from latent_diffusion.training.config import OptimConfig
from latent_diffusion.training.loop import adamw, learning_rate, set_learning_rate

log = logging.getLogger(__name__)

TEXT_ENCODER_METADATA_KEY = "ldm.text_encoder"


# The captions of the built-in model's training set (MODEL_CARD.md): one, two and three objects, alike
# objects a fifth of the time, seven captions in ten as people write them (every three-object one,
# three in five of the rest), the others in the grammar's phrasings that state every size (its 'short'
# one means "large" by a size it leaves out, where people mean either).
CAPTION_MIX = {"two_object_probability": 0.6, "three_object_probability": 0.25, "same_kind_probability": 0.3,
               "spoken_share": 0.6, "phrasings": ("natural", "tags", "background_first")}
MAX_OBJECTS = 3
IGNORED = -100  # a read the caption does not decide: not scored


def layout_targets(scene: Scene, caption: str, *, rule_out_places: bool = False) -> torch.Tensor:
    """``[len(POSITIONS) + 1 + MAX_OBJECTS, 3]`` class ids of the reads.

    Rows per position (shape, colour, size): 0 for "nothing here", 1 + the word's index otherwise,
    IGNORED where the caption leaves the places (or a size) open. Then the background row
    (background id, number of objects - 1), then one row per object in the caption's order:
    (shape, colour, size) with 0 for "no such object" and, for the size, "unsaid".

    ``rule_out_places``: where a caption allows several placements ("X beside Y": left and right in
    either order), the places none of them uses are scored as empty. Without it such a caption
    teaches nothing about where its objects go, and a UNet reading places from the tokens draws
    "beside" pairs one above the other a third of the time (MODEL_CARD.md, version 5).
    """
    described = read_description(caption)
    targets = torch.full((len(POSITIONS) + 1 + MAX_OBJECTS, 3), IGNORED, dtype=torch.long)
    places = stated_positions(described)
    if described.relation in THREE_OBJECT_LAYOUTS:
        # Three-object captions that name the row or column list the objects in its order.
        places = [THREE_OBJECT_LAYOUTS[described.relation]]
    if len(places) == 1 and None not in places[0]:
        targets[:len(POSITIONS)] = 0
        for obj, place in zip(described.objects, places[0]):
            row = targets[POSITIONS.index(place)]
            row[:] = torch.tensor(_object_ids(obj.shape, obj.colour, obj.size))
            if obj.size is None:
                row[2] = IGNORED  # either size fits the caption
    elif rule_out_places and all(None not in placement for placement in places):
        possible = {place for placement in places for place in placement}
        for place in POSITIONS:
            if place not in possible:
                targets[POSITIONS.index(place)] = 0
    background = len(POSITIONS)
    targets[background, :2] = torch.tensor([BACKGROUNDS.index(scene.background), len(described.objects) - 1])
    slots = targets[background + 1:]
    slots[:] = 0
    for slot, obj in zip(slots, described.objects):
        slot[:] = torch.tensor(_object_ids(obj.shape, obj.colour, obj.size))
    return targets


def _object_ids(shape: str, colour: str, size: str | None) -> tuple[int, int, int]:
    return 1 + SHAPES.index(shape), 1 + COLOURS.index(colour), 0 if size is None else 1 + SIZES.index(size)


class LayoutProbe(nn.Module):
    """One attention read per canvas position, for the background, for the count and per object."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(len(POSITIONS) + 2 + MAX_OBJECTS, width) / math.sqrt(width))
        self.to_k = nn.Linear(width, width, bias=False)
        self.to_v = nn.Linear(width, width, bias=False)
        self.shape = nn.Linear(width, len(SHAPES) + 1)
        self.colour = nn.Linear(width, len(COLOURS) + 1)
        self.size = nn.Linear(width, len(SIZES) + 1)
        self.background = nn.Linear(width, len(BACKGROUNDS))
        self.count = nn.Linear(width, MAX_OBJECTS)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Logits: shape, colour, size ``[B, positions + objects, classes]``, background ``[B, 3]``
        and count ``[B, MAX_OBJECTS]``."""
        weights = torch.softmax(self.queries @ self.to_k(tokens).transpose(1, 2) / math.sqrt(tokens.shape[-1]), dim=-1)
        read = weights @ self.to_v(tokens)
        n = len(POSITIONS)
        objects = torch.cat([read[:, :n], read[:, n + 2:]], dim=1)
        return (self.shape(objects), self.colour(objects), self.size(objects), self.background(read[:, n]),
                self.count(read[:, n + 1]))


def probe_loss(logits: Sequence[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over every scored read, per caption whether every scored read is right)."""
    shape, colour, size, background, count = logits
    n = len(POSITIONS)
    objects = torch.cat([targets[:, :n], targets[:, n + 1:]], dim=1)
    pairs = [(shape, objects[..., 0]), (colour, objects[..., 1]), (size, objects[..., 2]),
             (background, targets[:, n, 0]), (count, targets[:, n, 1])]
    loss = sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=IGNORED) for lg, tg in pairs)
    right = torch.stack([((lg.argmax(-1) == tg) | (tg == IGNORED)).reshape(len(tg), -1).all(1) for lg, tg in pairs])
    return loss, right.all(0)


@dataclass(frozen=True)
class CaptionSet:
    tokens: torch.Tensor  # [N, max_seq_len]
    targets: torch.Tensor  # [N, rows of layout_targets, 3]
    objects: torch.Tensor  # [N] objects in the scene


def caption_set(count: int, tokenizer: CLIPTokenizer, *, seed: int, split: str = "train",
                mix: dict | None = None, rule_out_places: bool = False) -> CaptionSet:
    """``count`` captions of random scenes drawn as the built-in model's training set draws them
    (``mix``: ShapesDataset options, CAPTION_MIX by default), tokenised, with their read targets
    (``rule_out_places``: layout_targets')."""
    dataset = ShapesDataset(count, seed=seed, split=split, **(CAPTION_MIX if mix is None else mix))
    captions, targets, objects = [], [], []
    for index in range(count):
        scene, caption, _ = dataset.scene(index)
        captions.append(caption)
        targets.append(layout_targets(scene, caption, rule_out_places=rule_out_places))
        objects.append(len(scene.objects))
    return CaptionSet(tokenizer(captions), torch.stack(targets), torch.tensor(objects))


@torch.no_grad()
def evaluate(encoder: nn.Module, probe: LayoutProbe, data: CaptionSet) -> dict[str, float]:
    """Fraction of captions whose every scored read is right: all, and by the number of objects."""
    right = torch.cat([probe_loss(probe(encoder(tokens)), targets)[1]
                       for tokens, targets in zip(data.tokens.split(512), data.targets.split(512))])
    figures = {"all": right.float().mean().item()}
    for objects, name in ((1, "one object"), (2, "two objects"), (3, "three objects")):
        chosen = data.objects == objects
        if chosen.any():
            figures[name] = right[chosen].float().mean().item()
    return figures


def pretrain(encoder: BERTTextEncoder, tokenizer: CLIPTokenizer, *, steps: int = 1000, batch_size: int = 128,
             lr: float = 1e-3, seed: int = 0, train_encoder: bool = True, pool: int = 50_000,
             probe: LayoutProbe | None = None, rule_out_places: bool = False) -> tuple[LayoutProbe, dict]:
    """Train ``encoder`` (or, with ``train_encoder=False``, only the probe) on the layout read.

    ``probe``: one already trained over this encoder, so that a trained encoder learning more is not
    pulled about by a random probe's first steps. Returns the probe and the held-out caption accuracy
    (fresh scenes, including the held-out colour-shape pairs, which the training captions never contain).
    """
    torch.manual_seed(seed)
    probe = LayoutProbe(encoder.config.n_embed) if probe is None else probe.train()
    train = caption_set(pool, tokenizer, seed=seed, rule_out_places=rule_out_places)
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
    fresh = caption_set(2000, tokenizer, seed=seed + 1, split="all", rule_out_places=rule_out_places)
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


def encoder_of(checkpoint: str | Path) -> tuple[BERTTextEncoder, CLIPTokenizer]:
    """The text encoder of an LDM single file (fp32) and its tokenizer; ValueError if it has none of ours."""
    from latent_diffusion.checkpoints.load import load_checkpoint

    encoder = load_checkpoint(str(checkpoint)).model.cond_stage_model.float()
    if not isinstance(encoder, BERTTextEncoder):
        raise ValueError(f"{checkpoint} has no BERTEmbedder text encoder")
    return encoder, CLIPTokenizer(pad_with_eos=True, context_length=encoder.config.max_seq_len)


def retune_encoder_of(checkpoint: str | Path, output: str | Path, *, steps: int = 1500, probe_steps: int = 1500,
                      lr: float = 2e-4, batch_size: int = 128, seed: int = 0, rule_out_places: bool = False,
                      pool: int = 50_000) -> tuple[Path, dict]:
    """Go on pre-training the text encoder of an LDM single file; write a copy of the file holding it.

    A probe first learns over the file's encoder alone (``probe_steps``), then both learn at ``lr``,
    so the encoder moves only as far as the reads ask. The file's UNet was fitted to the old tokens:
    fine-tune it on the copy (``ldm.init_checkpoint``; MODEL_CARD.md, version 6).
    """
    from latent_diffusion.checkpoints.io import read_safetensors_metadata, read_state_dict, save_safetensors

    encoder, tokenizer = encoder_of(checkpoint)
    options = dict(batch_size=batch_size, pool=pool, rule_out_places=rule_out_places)
    probe, _ = pretrain(encoder, tokenizer, steps=probe_steps, lr=1e-3, seed=seed, train_encoder=False, **options)
    _, figures = pretrain(encoder, tokenizer, steps=steps, lr=lr, seed=seed + 1, probe=probe, **options)
    tensors = read_state_dict(str(checkpoint))
    for name, value in encoder.state_dict().items():
        key = f"cond_stage_model.{name}"
        tensors[key] = value.to(tensors[key].dtype).contiguous()
    output = Path(output)
    save_safetensors(tensors, output, read_safetensors_metadata(str(checkpoint)))
    return output, figures


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", help="where to write the pre-trained encoder (.safetensors)")
    parser.add_argument("--probe", metavar="CHECKPOINT",
                        help="instead: freeze the text encoder of this LDM single file and train only the probe, "
                             "to measure how much of the layout its tokens carry")
    parser.add_argument("--init", metavar="CHECKPOINT",
                        help="instead: go on training the text encoder of this LDM single file (a probe learns over "
                             "it first) and write OUTPUT as a copy of the file with the new encoder")
    parser.add_argument("--rule-out-places", action="store_true",
                        help='score the places a caption that allows several placements ("X beside Y") leaves empty')
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-embed", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if (args.output is None) == (args.probe is None) or (args.init and args.probe):
        parser.error("give either OUTPUT (with --init CHECKPOINT or not) or --probe CHECKPOINT")
    if args.init:
        try:
            path, figures = retune_encoder_of(args.init, args.output, steps=args.steps, lr=args.lr,
                                              batch_size=args.batch_size, seed=args.seed,
                                              rule_out_places=args.rule_out_places)
        except (OSError, ValueError) as error:
            parser.error(str(error))
        print(json.dumps({"written": str(path), "captions read right": figures}))
        return
    if args.probe:
        try:
            encoder, tokenizer = encoder_of(args.probe)
        except (OSError, ValueError) as error:
            parser.error(str(error))
        _, figures = pretrain(encoder, tokenizer, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              seed=args.seed, train_encoder=False, rule_out_places=args.rule_out_places)
        print(json.dumps({"probe of": args.probe, "captions read right": figures}))
        return
    from latent_diffusion.training.ldm_model import CLIP_VOCAB_SIZE

    encoder = BERTTextEncoder(BERTTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_seq_len=args.max_seq_len,
                                             n_embed=args.n_embed, n_layer=args.n_layer))
    tokenizer = CLIPTokenizer(pad_with_eos=True, context_length=args.max_seq_len)
    _, figures = pretrain(encoder, tokenizer, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          rule_out_places=args.rule_out_places)
    path = save_text_encoder(encoder, args.output, figures)
    print(json.dumps({"written": str(path), "captions read right": figures}))


if __name__ == "__main__":
    main()
