"""Train the bundled tiny LLaVA on the synthetic suite, in LLaVA's three stages, on one GPU.

1. Vision tower pretraining (tower + throw-away heads): the CLS token's pooled output predicts the
   scene's global attributes (which colour-shape pairs are present, per-colour and per-shape counts,
   which texts are present, the object count, the background tone), so CLS is the image's global
   summary and its last-layer attention looks at the objects; a dense head on the patch tokens of
   hidden_states[-2] (what the LLM reads) predicts each patch's object colour / shape / size,
   object centres, text, the object that text belongs to, the character centred in the patch, and
   the patch's row and column.
2. Projector alignment (tower frozen): projector + LM learn to caption the scene ("red circle
   top-left 47 . ..."). The LM starts from scratch here, unlike LLaVA's pretrained LLM, so it
   trains with the projector.
3. Instruction tuning (tower frozen): projector + LM on the suite's questions, asked as one multi-turn
   conversation per image (up to `--turns` questions in random order, so every question type also
   comes first, the evaluated layout), loss on every answer + eos. A grounding loss
   (`--ground-weight`, `--ground-layers`, `--ground-head`) teaches one head of two LM layers to attend,
   from the position that predicts each answer, to the patches of the objects the question refers to
   (their shape or their text). Without it the from-scratch LM sits for thousands of steps on the
   answer priors before it discovers where to look among 576 tokens; with it the answer loss falls
   within a few hundred steps. The LM is free to use any head for answering; only these two are guided.
   Optional curriculum (`--sparse-fraction`, off by default): the first part of the stage feeds the LM
   only the object / text rows (plus a few background rows) at their dense positions.
   Optional augmentation (`--reduce-fraction`, off by default): on that share of the steps each image
   gives the LM only a subset of its rows (5-50% by default, object / text rows first on half of those
   steps, uniformly random on the rest), renumbered as encoder-side methods hand them over. A model
   trained on dense sequences only reads an object's place from RoPE distances, which a shorter
   renumbered sequence distorts; with these steps it reads it from the features (the tower is trained
   to encode each patch's row and column), as real LLaVA models largely do. A deviation from plain
   LLaVA training, made so that the suite ranks reduction methods as real models do.

Images are rendered by DataLoader workers from seeds (`SceneStream`) and kept in a GPU replay buffer:
every step takes one fresh batch and fills the rest of its batch from the buffer. A time guard ends
training early and still saves. The bundled weights came from three runs (docs/results/README.md gives
the exact commands, the step counts and the GPU time):

    python -m visprune.train.tiny --out /tmp/runA --seed 0 --stage1-seconds 360 --stage2-seconds 20 \
        --stage3-seconds 150 --time-limit 570 --reserve 25 --ground-weight 0
    python -m visprune.train.tiny --out /tmp/runB --seed 0 --resume /tmp/runA --stages 3 \
        --stage3-seconds 530 --stream-start 200000 --time-limit 575 --reserve 25
    python -m visprune.train.tiny --out /tmp/runC --resume /tmp/runB --stages 3 --stage3-seconds 420 \
        --time-limit 480 --reserve 30 --reduce-fraction 0.5 --reduce-content 0.7 --lr-instruct 3e-4 \
        --stream-start 500000

Stages end at their step count or their seconds (`--stageN-seconds`, the default), so a time-limited
run's step count depends on the GPU. The end-of-run check measures the validation split
(`--eval-split`); the test split is left to `visprune eval`.

`--out` receives a complete Hugging Face folder (fp16 safetensors shards of at most 15 MB, config,
processor) and train_log.json; `python -m visprune.train.tiny --export DIR` writes the config and
processor files alone (for a folder that already holds the shards).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from visprune.models.decoder import layer_qk
from visprune.synth import FAMILIES, load_split
from visprune.train.build import CLIP_MEAN, CLIP_STD, TinyConfig, build_config, build_model, build_processor
from visprune.train.data import (
    CAPTION_PROMPT_IDS,
    COUNT_CLASSES,
    GLOBAL_LAYOUT,
    GRID,
    N_PATCHES,
    PAD_ID,
    PATCH_FIELDS,
    PREFIX_IDS,
    SUFFIX_LEN,
    USER_IDS,
    SceneStream,
    ids_of,
    question_suffix,
)

SHARD_SIZE = "15MB"
HEADS_FILE = "pretrain_heads.safetensors"  # stage-1 heads (not part of the model), to resume stage 1
FIELD_WEIGHTS = {"text": 2.0, "char": 2.0}  # reading is the slowest skill to learn: weigh its labels up


@dataclass
class TrainArgs:
    """Hyper-parameters of one training run (saved in train_log.json)."""

    seed: int = 0
    stages: tuple[int, ...] = (1, 2, 3)
    stage1_steps: int = 100_000  # each stage ends at its step count or its seconds, whichever comes first
    stage2_steps: int = 100_000
    stage3_steps: int = 100_000
    stage1_seconds: float = 300.0  # 0: the schedule follows the step count alone (exactly reproducible)
    stage2_seconds: float = 35.0
    stage3_seconds: float = 165.0
    stage1_batch: int = 256
    stage2_batch: int = 192
    stage3_images: int = 128
    turns: int = 12  # questions per image, asked as one multi-turn conversation
    ground_weight: float = 0.5  # weight of the stage-3 grounding loss (0: answer loss alone)
    ground_layers: str = "2,5"  # LM layers whose head `ground_head` is taught to look at the asked objects
    ground_head: int = 0
    sparse_fraction: float = 0.0  # stage 3 curriculum: this first fraction feeds the LM only object rows
    sparse_tokens: int = 192  # rows per image in that phase (object / text patches first, then background)
    sparse_background: float = 0.08  # chance that a background patch is preferred like an object patch
    # Stage 3 augmentation: on this share of steps the LM sees a subset of each image's rows, renumbered
    # (as encoder-side methods hand it), so it reads position from the features, not from RoPE distances.
    reduce_fraction: float = 0.0
    reduce_min: float = 0.05  # the kept share of the N rows on such a step, drawn uniformly in [min, max]
    reduce_max: float = 0.5
    reduce_content: float = 0.5  # share of those steps whose subset prefers object / text rows (else uniform)
    fresh: int = 32  # images rendered per DataLoader batch
    stage1_fresh: int = 2  # fresh DataLoader batches per step in each stage
    lm_fresh: int = 1
    replay: int = 32768
    lr_tower: float = 1e-3
    lr_align: float = 1e-3
    lr_instruct: float = 1e-3
    warmup: float = 0.05
    weight_decay: float = 0.05
    workers: int = 14
    time_limit: float = 560.0  # seconds from start; training stops in time to evaluate and save
    reserve: float = 30.0  # seconds kept for evaluation and saving
    eval_items: int = 1008
    eval_split: str = "val"  # the end-of-run check; the test split is kept for the final evaluation
    stream_start: int = 0  # first DataLoader batch index (a resumed run uses new scenes)
    log_every: int = 100
    config: dict[str, Any] = field(default_factory=lambda: TinyConfig().to_dict())


class PretrainHeads(nn.Module):
    """Stage-1 heads: dense attributes from patch tokens, global attributes from the pooled CLS."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense_norm = nn.LayerNorm(width)
        self.dense = nn.Linear(width, sum(PATCH_FIELDS.values()) + 2 * GRID)
        self.glob = nn.Linear(width, sum(_global_logits(name, w) for name, (_, w) in GLOBAL_LAYOUT.items()))


def _global_logits(name: str, width: int) -> int:
    """Logits of one global label group: one per multi-label entry, a count class per count, 2-way tone."""
    if name in ("pairs", "texts"):
        return width
    if name.endswith("counts") or name == "objects":
        return width * COUNT_CLASSES
    return 2


def _tower_parts(tower: nn.Module) -> tuple[nn.Module, nn.Module, nn.ModuleList, nn.Module]:
    body = getattr(tower, "vision_model", tower)
    return body.embeddings, body.pre_layrnorm, body.encoder.layers, body.post_layernorm


def run_tower(tower: nn.Module, pixels: Tensor, pooled: bool) -> tuple[Tensor, Tensor | None]:
    """(hidden_states[-2] with CLS, pooled CLS output or None); the last layer runs only if `pooled`."""
    embeddings, pre_norm, layers, post_norm = _tower_parts(tower)
    hidden = pre_norm(embeddings(pixels))
    for layer in layers[:-1]:
        out = layer(hidden, None)
        hidden = out[0] if isinstance(out, tuple) else out
    if not pooled:
        return hidden, None
    out = layers[-1](hidden, None)
    last = out[0] if isinstance(out, tuple) else out
    return hidden, post_norm(last[:, 0])


def normalise(images: Tensor) -> Tensor:
    """uint8 [B, H, W, 3] -> CLIP-normalised float [B, 3, H, W] (what the processor produces)."""
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def pretrain_loss(tower: nn.Module, heads: PretrainHeads, pixels: Tensor, patch: Tensor, glob: Tensor) -> tuple:
    """Stage-1 loss and metrics (accuracy of the dense heads on object / text patches)."""
    hidden, pooled = run_tower(tower, pixels, pooled=True)
    dense = heads.dense(heads.dense_norm(hidden[:, 1:])).float()  # [B, N, D]
    patch = patch.long()
    on_object = (patch[..., 0] > 0) | (patch[..., 4] > 0)
    weight = 1.0 + 4.0 * on_object.float()
    losses: dict[str, Tensor] = {}
    metrics: dict[str, Tensor] = {}
    offset = 0
    for i, (name, width) in enumerate(PATCH_FIELDS.items()):
        logits = dense[..., offset : offset + width]
        offset += width
        ce = F.cross_entropy(logits.reshape(-1, width), patch[..., i].reshape(-1), reduction="none")
        losses[name] = (ce * weight.reshape(-1)).sum() / weight.sum() * FIELD_WEIGHTS.get(name, 1.0)
        mask = (patch[..., i] > 0).float()
        hits = (logits.argmax(-1) == patch[..., i]).float()
        metrics[f"acc_{name}"] = (hits * mask).sum() / mask.sum().clamp(min=1)
    pos = torch.arange(N_PATCHES, device=pixels.device)
    for name, target in (("row", pos // GRID), ("col", pos % GRID)):
        logits = dense[..., offset : offset + GRID]
        offset += GRID
        losses[name] = F.cross_entropy(logits.reshape(-1, GRID), target.repeat(dense.shape[0])) * 0.25
    g = heads.glob(pooled).float()
    glob = glob.long()
    o = 0
    for name, (start, width) in GLOBAL_LAYOUT.items():
        target = glob[:, start : start + width]
        n = _global_logits(name, width)
        logits = g[:, o : o + n]
        o += n
        if name in ("pairs", "texts"):
            losses[f"g_{name}"] = F.binary_cross_entropy_with_logits(logits, target.float()) * 10.0
        else:
            classes = n // width
            logits = logits.reshape(-1, width, classes)
            losses[f"g_{name}"] = F.cross_entropy(logits.reshape(-1, classes), target.reshape(-1))
            metrics[f"acc_g_{name}"] = (logits.argmax(-1) == target).float().mean()
    return sum(losses.values()), {k: v.detach() for k, v in losses.items()} | metrics


def lm_loss(
    model: nn.Module, feats: Tensor, suffix: Tensor, targets: Tensor, rows: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Next-token loss on `targets` [Bs, S] (bool) of `suffix` [Bs, S], given projected image rows [Bs, K, D].

    The sequence is bos, "user", ":", the K image rows, then the suffix (right-padded; padding only
    follows real tokens, so the causal mask alone is enough). `rows` [Bs, K]: the grid index of each
    image row when only some of the N rows are given; every token then keeps the position it has in
    the dense sequence. Returns (loss, token accuracy).
    """
    emb = model.get_input_embeddings()
    prefix = emb(torch.tensor(PREFIX_IDS, device=suffix.device)).unsqueeze(0).expand(suffix.shape[0], -1, -1)
    x = torch.cat([prefix, feats.to(prefix.dtype), emb(suffix)], dim=1)
    positions = None
    if rows is not None:
        p = prefix.shape[1]
        head = torch.arange(p, device=suffix.device).expand(suffix.shape[0], -1)
        tail = p + N_PATCHES + torch.arange(suffix.shape[1], device=suffix.device).expand(suffix.shape[0], -1)
        positions = torch.cat([head, p + rows, tail], dim=1)
    hidden = model.model.language_model(inputs_embeds=x, position_ids=positions).last_hidden_state
    start = prefix.shape[1] + feats.shape[1]
    logits = model.lm_head(hidden[:, start - 1 : start - 1 + suffix.shape[1]]).float()
    labels = torch.where(targets, suffix, -100)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    hits = ((logits.argmax(-1) == suffix) & targets).sum()
    return loss, hits / targets.sum().clamp(min=1)


class Replay:
    """A ring buffer of examples on the GPU; `add` stores a batch and returns its slots."""

    def __init__(self, capacity: int, device: torch.device, generator: torch.Generator) -> None:
        self.capacity, self.device, self.gen = capacity, device, generator
        self.data: dict[str, Tensor] = {}
        self.size = self.ptr = 0

    def add(self, batch: dict[str, Tensor]) -> Tensor:
        n = next(iter(batch.values())).shape[0]
        if not self.data:
            self.data = {
                k: torch.empty((self.capacity, *v.shape[1:]), dtype=v.dtype, device=self.device)
                for k, v in batch.items()
            }
        slots = (torch.arange(n, device=self.device) + self.ptr) % self.capacity
        for k, v in batch.items():
            self.data[k][slots] = v.to(self.device, non_blocking=True)
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        return slots

    def batch(self, fresh: Tensor, total: int) -> dict[str, Tensor]:
        """The fresh slots plus `total - len(fresh)` slots drawn uniformly from the buffer."""
        extra = torch.randint(self.size, (max(0, total - len(fresh)),), device=self.device, generator=self.gen)
        idx = torch.cat([fresh, extra])
        return {k: v[idx] for k, v in self.data.items()}


def cosine_lr(progress: float, peak: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` of training, then cosine decay to 5% of `peak`.

    progress: the fraction of the stage done (steps or seconds), in [0, 1].
    """
    if progress < warmup:
        return peak * max(progress / warmup, 0.01)
    t = (progress - warmup) / max(1e-9, 1 - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def make_optimizer(modules: list[nn.Module], lr: float, wd: float, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-8, fused=device.type == "cuda")


class EvalItems(Dataset):
    """Rendered items of a split with their prompt suffix ids (no answer), answer id and family index."""

    def __init__(self, split: str, n: int) -> None:
        self.split = load_split(split, n)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.split[i]
        ids = question_suffix(item.text)
        suffix = np.full(SUFFIX_LEN, PAD_ID, dtype=np.int64)
        suffix[: len(ids)] = ids
        return {
            "image": torch.from_numpy(np.asarray(item.image(), dtype=np.uint8).copy()),
            "suffix": torch.from_numpy(suffix),
            "length": len(ids),
            "answer": ids_of(item.answer)[0],
            "family": FAMILIES.index(item.family),
        }


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Dense accuracy (greedy first answer token) per family and overall."""
    model.eval()
    correct = torch.zeros(len(FAMILIES))
    total = torch.zeros(len(FAMILIES))
    for batch in loader:
        pixels = normalise(batch["image"].to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden, _ = run_tower(model.model.vision_tower, pixels, pooled=False)
            feats = model.model.multi_modal_projector(hidden[:, 1:])
            suffix = batch["suffix"].to(device)
            emb = model.get_input_embeddings()
            prefix = emb(torch.tensor(PREFIX_IDS, device=device)).unsqueeze(0).expand(suffix.shape[0], -1, -1)
            x = torch.cat([prefix, feats.to(prefix.dtype), emb(suffix)], dim=1)
            h = model.model.language_model(inputs_embeds=x).last_hidden_state
            last = prefix.shape[1] + feats.shape[1] + batch["length"].to(device) - 1
            pred = model.lm_head(h[torch.arange(h.shape[0], device=device), last]).argmax(-1).cpu()
        ok = (pred == batch["answer"]).float()
        correct.index_add_(0, batch["family"], ok)
        total.index_add_(0, batch["family"], torch.ones_like(ok))
    model.train()
    result = {f: (correct[i] / total[i]).item() for i, f in enumerate(FAMILIES) if total[i] > 0}
    result["overall"] = (correct.sum() / total.sum()).item()
    return result


def _dialogues(batch: dict[str, Tensor], turns: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """One multi-turn conversation per image, as LLaVA's instruction data: up to `turns` of the scene's
    questions in random order, each turn after the first opening with "USER:". Returns the token ids
    after the image [B, L] (right-padded), the target mask [B, L] (every answer and its eos) and, at each
    answer token, the bit mask of the objects its question refers to [B, L] (0 elsewhere).

    Every question type lands in the first turn (the evaluation's layout) equally often, and each image
    pays for its 576 visual tokens once for all its answers."""
    q_ids, q_len = batch["q_ids"].long(), batch["q_len"].long()
    images, _, width = q_ids.shape
    device = q_ids.device
    score = torch.rand(q_len.shape, device=device, generator=gen).masked_fill(q_len == 0, -1.0)
    pick = score.topk(min(turns, q_len.shape[1]), dim=1).indices  # valid questions first, shuffled
    ids = q_ids.gather(1, pick.unsqueeze(-1).expand(-1, -1, width))  # [B, T, S]
    length = q_len.gather(1, pick).unsqueeze(-1)  # [B, T, 1]; 0 for picks past the scene's questions
    j = torch.arange(width, device=device)
    real = j < length
    targets = (j >= length - 2) & real
    refers = torch.where(j == length - 2, batch["q_obj"].long().gather(1, pick).unsqueeze(-1), 0)
    user = torch.tensor(USER_IDS, device=device).expand(images, pick.shape[1], -1)
    later = torch.arange(pick.shape[1], device=device).view(1, -1, 1) > 0
    user_real = (length > 0) & later
    ids = torch.cat([user, ids], dim=2).flatten(1)
    real = torch.cat([user_real.expand(-1, -1, len(USER_IDS)), real], dim=2).flatten(1)
    targets = torch.cat([torch.zeros_like(user, dtype=torch.bool), targets], dim=2).flatten(1)
    refers = torch.cat([torch.zeros_like(user), refers], dim=2).flatten(1)
    order = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices  # real tokens first, in order
    keep = int(real.sum(1).max())
    order = order[:, :keep]
    ids = ids.gather(1, order).masked_fill(~real.gather(1, order), PAD_ID)
    return ids, targets.gather(1, order), refers.gather(1, order)


class LayerInputs:
    """Records what chosen decoder layers receive (hidden states, rotary embeddings) in a forward pass."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.seen: dict[int, tuple[Tensor, tuple[Tensor, Tensor]]] = {}
        self.handles = [
            layer.register_forward_pre_hook(functools.partial(self._record, i), with_kwargs=True)
            for i, layer in enumerate(layers)
        ]

    def _record(self, i: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.seen[i] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def grounding_loss(inputs: LayerInputs, refers: Tensor, owner: Tensor, image_start: int, head: int = 0) -> Tensor:
    """Mean -log of the attention mass that head `head` of each recorded layer puts, from the position that
    predicts each answer, on the patches of the objects its question refers to.

    refers [B, S]: object bit masks at the answer tokens of the suffix; owner [B, N]: 1 + the object index of
    each image row (0: background); the image rows start at `image_start`. Answers that refer to no object
    (e.g. "no" to an existence question) or to objects with no labelled patch are left out. This teaches
    the from-scratch LM where to look far sooner than the answer loss alone, which must discover it."""
    b, s = refers.nonzero(as_tuple=True)
    n = owner.shape[1]
    own = owner[b].long()
    target = (own > 0) & (((refers[b, s].unsqueeze(1) >> (own - 1).clamp(min=0)) & 1) == 1)
    keep = target.any(1)
    b, s, target = b[keep], s[keep], target[keep]
    if b.numel() == 0:
        return refers.new_zeros((), dtype=torch.float32)
    rows = image_start + n + s - 1
    losses = []
    for i, layer in enumerate(inputs.layers):
        hidden, position_embeddings = inputs.seen[i]
        q, k = layer_qk(layer, hidden, position_embeddings)
        kv_head = head * k.shape[1] // q.shape[1]
        scores = torch.einsum("rd,rsd->rs", q[b, head, rows].float(), k[b, kv_head].float())
        scores = scores * layer.self_attn.scaling
        future = torch.arange(k.shape[2], device=k.device).unsqueeze(0) > rows.unsqueeze(1)
        attention = scores.masked_fill(future, float("-inf")).softmax(-1)[:, image_start : image_start + n]
        losses.append(-torch.log((attention * target).sum(-1) + 1e-6).mean())
    return torch.stack(losses).mean()


def _sparse_rows(patch: Tensor, k: int, background: float, gen: torch.Generator) -> Tensor:
    """[B, k] ascending grid indices: every object / text patch (up to k), then random background ones.

    The curriculum's first phase feeds the LM these rows only, at their dense positions, so that it
    learns to find objects among ~k tokens before it has to among all N."""
    content = (patch[..., 0] > 0) | (patch[..., 4] > 0)
    noise = torch.rand(content.shape, device=patch.device, generator=gen)
    score = content.float() * 2 + (noise < background).float() + noise
    return score.topk(k, dim=1).indices.sort(dim=1).values


def _reduced_rows(patch: Tensor, args: TrainArgs, gen: torch.Generator) -> Tensor:
    """[B, k] ascending grid indices of a reduced step: k = round(N * share), share drawn uniformly in
    [reduce_min, reduce_max] (one k for the batch); with chance reduce_content the object / text rows
    come first (as attention-based methods keep them), otherwise the k rows are uniformly random."""
    n = patch.shape[1]
    draws = torch.rand(2, generator=gen, device=gen.device).tolist()
    k = max(1, min(n, round(n * (args.reduce_min + (args.reduce_max - args.reduce_min) * draws[0]))))
    if draws[1] < args.reduce_content:
        return _sparse_rows(patch, k, args.sparse_background, gen)
    noise = torch.rand(patch.shape[:2], device=patch.device, generator=gen)
    return noise.topk(k, dim=1).indices.sort(dim=1).values


def _captions(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    ids, length = batch["cap_ids"].long(), batch["cap_len"].long()
    j = torch.arange(ids.shape[1], device=ids.device)
    return ids, (j >= len(CAPTION_PROMPT_IDS)) & (j < length.unsqueeze(1))


class Trainer:
    """Runs the stages with a shared data stream, replay buffer, time guard and log."""

    def __init__(self, args: TrainArgs, out: Path, resume: Path | None, heads: Path | None = None) -> None:
        self.args, self.out = args, out
        self.t0 = time.perf_counter()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        cfg = TinyConfig(**args.config)
        if resume is not None:
            from transformers import LlavaForConditionalGeneration

            config = build_config(cfg)  # from code, so any transformers 5.x reads the weights alike
            self.model = LlavaForConditionalGeneration.from_pretrained(resume, config=config, dtype=torch.float32)
        else:
            self.model = build_model(cfg, seed=args.seed)
        self.model.to(self.device).train()
        self.gen = torch.Generator(device=self.device).manual_seed(args.seed + 1)
        self.replay = Replay(args.replay, self.device, self.gen)
        stream = SceneStream(base_seed=args.seed * 2**32, batch_size=args.fresh, start=args.stream_start)
        self.loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=args.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=6 if args.workers else None,
            persistent_workers=args.workers > 0,
        )
        self.stream: Iterator[dict[str, Tensor]] = iter(self.loader)
        self.log: dict[str, Any] = {"args": asdict(args), "stages": {}, "device": self._device_name()}
        self.stopped_early = False
        self.data_wait = 0.0
        self.progress = 0.0
        self.heads = PretrainHeads(self.model.model.vision_tower.config.hidden_size).to(self.device)
        if heads is not None:
            from safetensors.torch import load_file

            self.heads.load_state_dict(load_file(heads))

    def _device_name(self) -> str:
        return torch.cuda.get_device_name(0) if self.device.type == "cuda" else "cpu"

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def out_of_time(self) -> bool:
        return self.elapsed() > self.args.time_limit - self.args.reserve

    def _fresh(self, count: int) -> Tensor:
        t = time.perf_counter()
        batches = [next(self.stream) for _ in range(count)]
        self.data_wait += time.perf_counter() - t
        return torch.cat([self.replay.add(b) for b in batches])

    def _loop(
        self, name: str, steps: int, seconds: float, params: list[nn.Module], lr: float, step_fn: Any, fresh: int
    ) -> None:
        """Train `params` with `step_fn` until `steps` or `seconds` (if > 0) are used up, or time runs out."""
        opt = make_optimizer(params, lr, self.args.weight_decay, self.device)
        record: dict[str, Any] = {"steps_planned": steps, "seconds_planned": seconds, "log": []}
        t_start, done = self.elapsed(), 0
        self.data_wait = 0.0
        for step in range(steps):
            progress = step / steps
            if seconds > 0:
                progress = max(progress, (self.elapsed() - t_start) / seconds)
            if progress >= 1.0:
                break
            if self.out_of_time():
                self.stopped_early = True
                break
            self.progress = progress
            for group in opt.param_groups:
                group["lr"] = cosine_lr(progress, lr, self.args.warmup)
            slots = self._fresh(fresh)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                loss, metrics = step_fn(slots)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for m in params for p in m.parameters() if p.requires_grad], 1.0)
            opt.step()
            done = step + 1
            if step % self.args.log_every == 0:
                entry = {"step": step, "loss": round(loss.item(), 4), "t": round(self.elapsed(), 1)} | {
                    k: round(float(v), 4) for k, v in metrics.items()
                }
                record["log"].append(entry)
                print(f"[{name}] " + " ".join(f"{k}={v}" for k, v in entry.items()), flush=True)
        record["steps_done"] = done
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        record["seconds"] = round(self.elapsed() - t_start, 1)
        record["data_wait_seconds"] = round(self.data_wait, 1)
        print(f"[{name}] {done} steps in {record['seconds']}s (waiting for data {record['data_wait_seconds']}s)")
        self.log["stages"][name] = record

    def stage1(self) -> None:
        a = self.args
        tower = self.model.model.vision_tower
        heads = self.heads

        def step(slots: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            b = self.replay.batch(slots, a.stage1_batch)
            return pretrain_loss(tower, heads, normalise(b["image"]), b["patch"], b["global"])

        self._set_trainable(tower=True, lm=False)
        self._loop("stage1_tower", a.stage1_steps, a.stage1_seconds, [tower, heads], a.lr_tower, step, a.stage1_fresh)

    def _image_rows(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            hidden, _ = run_tower(self.model.model.vision_tower, normalise(images), pooled=False)
        return self.model.model.multi_modal_projector(hidden[:, 1:])

    def stage2(self) -> None:
        a = self.args

        def step(slots: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            b = self.replay.batch(slots, a.stage2_batch)
            ids, targets = _captions(b)
            loss, acc = lm_loss(self.model, self._image_rows(b["image"]), ids, targets)
            return loss, {"tok_acc": acc}

        self._set_trainable(tower=False, lm=True)
        self._loop("stage2_align", a.stage2_steps, a.stage2_seconds, self._lm_modules(), a.lr_align, step, a.lm_fresh)

    def stage3(self) -> None:
        a = self.args

        def step(slots: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            b = self.replay.batch(slots, a.stage3_images)
            suffix, targets, refers = _dialogues(b, a.turns, self.gen)
            feats = self._image_rows(b["image"])
            rows = kept = None
            if self.progress < a.sparse_fraction:
                rows = _sparse_rows(b["patch"], a.sparse_tokens, a.sparse_background, self.gen)
                feats = feats.gather(1, rows.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
            elif float(torch.rand(1, generator=self.gen, device=self.gen.device)) < a.reduce_fraction:
                kept = _reduced_rows(b["patch"], a, self.gen)  # renumbered: lm_loss gets no rows
                feats = feats.gather(1, kept.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
            loss, acc = lm_loss(self.model, feats, suffix, targets, rows)
            metrics = {
                "tok_acc": acc,
                "sparse": torch.tensor(float(rows is not None)),
                "reduced": torch.tensor(float(kept is not None)),
            }
            if recorder is not None and rows is None and kept is None:
                ground = grounding_loss(recorder, refers, b["owner"], len(PREFIX_IDS), a.ground_head)
                loss = loss + a.ground_weight * ground
                metrics["ground"] = ground.detach()
            return loss, metrics

        layers = [int(i) for i in a.ground_layers.split(",") if i] if a.ground_weight > 0 else []
        decoder_layers = self.model.model.language_model.layers
        if any(not 0 <= i < len(decoder_layers) for i in layers):
            raise SystemExit(
                f"--ground-layers {a.ground_layers}: this LM has layers 0..{len(decoder_layers) - 1}; "
                "pass layers in that range (or --ground-weight 0)"
            )
        recorder = LayerInputs([decoder_layers[i] for i in layers]) if layers else None
        self._set_trainable(tower=False, lm=True)
        try:
            self._loop(
                "stage3_instruct", a.stage3_steps, a.stage3_seconds, self._lm_modules(), a.lr_instruct, step, a.lm_fresh
            )
        finally:
            if recorder is not None:
                recorder.remove()

    def _lm_modules(self) -> list[nn.Module]:
        return [self.model.model.multi_modal_projector, self.model.model.language_model, self.model.lm_head]

    def _set_trainable(self, tower: bool, lm: bool) -> None:
        for p in self.model.model.vision_tower.parameters():
            p.requires_grad_(tower)
        for m in self._lm_modules():
            for p in m.parameters():
                p.requires_grad_(lm)

    def run(self) -> None:
        a = self.args
        print(f"device {self._device_name()}, workers {a.workers}, stages {a.stages}", flush=True)
        for stage in a.stages:
            if self.out_of_time():
                self.stopped_early = True
                break
            {1: self.stage1, 2: self.stage2, 3: self.stage3}[stage]()
        self.log["train_seconds"] = round(self.elapsed(), 1)
        self.log["stopped_early"] = self.stopped_early
        self.save()
        if a.eval_items:
            loader = DataLoader(EvalItems(a.eval_split, a.eval_items), batch_size=144, num_workers=a.workers)
            t = self.elapsed()
            self.log[f"{a.eval_split}_accuracy"] = evaluate(self.model, loader, self.device)
            self.log["eval_seconds"] = round(self.elapsed() - t, 1)
            print(f"{a.eval_split} accuracy", json.dumps(self.log[f"{a.eval_split}_accuracy"]), flush=True)
        self.log["total_seconds"] = round(self.elapsed(), 1)
        (self.out / "train_log.json").write_text(json.dumps(self.log, indent=1))

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        model = self.model
        state = {k: v.detach().to("cpu", torch.float16) for k, v in model.state_dict().items()}
        model.save_pretrained(self.out, state_dict=state, max_shard_size=SHARD_SIZE)
        export(self.out, TinyConfig(**self.args.config))
        if 1 in self.args.stages:
            from safetensors.torch import save_file

            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()}, self.out / HEADS_FILE
            )
        print(f"saved to {self.out} at {self.elapsed():.1f}s", flush=True)


def export(dest: Path, cfg: TinyConfig | None = None) -> None:
    """Write config.json (fp16 weights), generation_config.json and the processor files into `dest`."""
    from transformers import GenerationConfig

    dest.mkdir(parents=True, exist_ok=True)
    config = build_config(cfg)
    config.dtype = "float16"
    config.architectures = ["LlavaForConditionalGeneration"]  # what AutoModel* classes load it as
    config.save_pretrained(dest)
    text = config.text_config
    GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id
    ).save_pretrained(dest)
    build_processor(cfg).save_pretrained(dest)


def parse_args(argv: list[str] | None = None) -> tuple[TrainArgs, argparse.Namespace]:
    defaults = TrainArgs()
    p = argparse.ArgumentParser(prog="python -m visprune.train.tiny", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="output folder (Hugging Face format + train_log.json)")
    p.add_argument("--export", type=Path, help="only write config and processor files into this folder")
    p.add_argument("--resume", type=Path, default=None, help="start from this checkpoint folder")
    p.add_argument("--heads", type=Path, default=None, help=f"stage-1 heads to resume stage 1 with ({HEADS_FILE})")
    p.add_argument("--stages", default="1,2,3", help="comma-separated stages to run (1 tower, 2 align, 3 instruct)")
    p.add_argument("--tiny", action="store_true", help="a minute-long CPU smoke configuration")
    for f in TrainArgs.__dataclass_fields__.values():
        if f.name in ("stages", "config"):
            continue
        value = getattr(defaults, f.name)
        p.add_argument("--" + f.name.replace("_", "-"), type=type(value), default=value)
    ns = p.parse_args(argv)
    values = {f: getattr(ns, f) for f in TrainArgs.__dataclass_fields__ if f not in ("stages", "config")}
    args = TrainArgs(**values, stages=tuple(int(s) for s in ns.stages.split(",") if s))
    if ns.tiny:
        small = TinyConfig(
            vision_hidden=64,
            vision_layers=2,
            vision_heads=2,
            vision_mlp=128,
            text_hidden=64,
            text_layers=2,
            text_heads=2,
            text_mlp=128,
        )
        args.config = small.to_dict()
        args.ground_layers = "0,1"  # its LM has two layers
    return args, ns


def main(argv: list[str] | None = None) -> int:
    args, ns = parse_args(argv)
    if ns.export is not None:
        export(ns.export, TinyConfig(**args.config))
        return 0
    if ns.out is None:
        raise SystemExit("--out is required")
    torch.manual_seed(args.seed)
    Trainer(args, ns.out, ns.resume, ns.heads).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
