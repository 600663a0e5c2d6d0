"""In-LLM token pruning at prefill, with forward pre-hooks on the decoder layers.

At each stage layer the pre-hook scores the current sequence with the method's function, gathers the
kept hidden states (kept tokens keep their original RoPE positions), and from there on hands every
later layer the shorter sequence's attention mask and position embeddings. Layers are never re-run.
Decode steps reuse the shorter caches: layers after a stage get a mask over that stage's kept tokens
plus the generated ones. Per-sample kept counts may differ; shorter rows are left-padded with masked
slots. Nothing reads `cache_position` and no attention weights are materialised.

The shorter sequence's length is read from the keep mask (a host read at each stage), except for a method
with a count rule (`MethodSpec.visual_kept`: fastv, pdrop, dart, sparsevlm, knee+text with a text_keep_ratio):
its counts follow from the host's token counts, so the host plans the stage without waiting for the device,
and the mask's counts are checked against the plan at the end of the prefill (`VisPruneError` if a rule and
its method disagree).
Such a method's prefill and decode steps read nothing from the device (on a static cache, a decode step's
mask is built from the cache's length on the device), so the launch-free path can capture them as CUDA
graphs: `graph_key`, `graph_inputs`, `bind_graph_inputs`, `graph_outputs` and `adopt_graph_outputs` give it
what a replay needs from and gives back to this pruner's host state, and `finish_prefill` reads the counts
after the graph.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from visprune.compat import attended_keys, filled_length
from visprune.errors import InputError, VisPruneError
from visprune.launch_free import round_up
from visprune.methods.base import MethodSpec, TokenLayout
from visprune.methods.checks import DeviceChecks, deferred_device_checks
from visprune.methods.llm_attention import query_or_last, rows_from_mask
from visprune.models.decoder import layer_qk


@dataclass
class _Group:
    """The sequence as the layers from one stage on see it."""

    start_layer: int
    index: Tensor  # [B, S_g] positions in the prefill sequence (the one entering layer 0)
    valid: Tensor  # [B, S_g] bool: real kept token (False: padding slot)
    prefill_mask: Any
    position_embeddings: tuple[Tensor, Tensor]
    position_ids: Tensor | None
    all_valid: bool  # no padding slots: masks can be left to the attention kernel


@dataclass
class PrunerState:
    """Per-call state: reset by `begin` before each prefill."""

    layout: TokenLayout | None = None
    prefill_layout: TokenLayout | None = None  # the layout of the whole prefill sequence (layer 0's)
    phase: str = "off"  # off | prefill | decode
    groups: list[_Group] = field(default_factory=list)
    tokens_per_layer: list[list[int]] = field(default_factory=list)
    real_tokens: list[int] = field(default_factory=list)
    signals: dict[str, Tensor] = field(default_factory=dict)
    rows_per_sample: int = 1  # > 1 when generate expanded the batch (beam search, several return sequences)
    # The prefill's image tokens per sample on the host (None: not known there); the real tokens per sample
    # after each stage that a method's `visual_kept` rule gives from them and `real_tokens` (`plan`, computed
    # on first use); and per stage planned that way, (decoder layer, the keep mask's counts [B] on the device,
    # the planned counts) for the check at the end of the prefill. `width_multiple`: a planned stage's sequence
    # is padded to a multiple of it (masked slots), and the text-row bound rounded up to one (`begin`).
    width_multiple: int = 1
    host_visual: list[int] | None = None
    plan: list[list[int]] | None = None
    planned: list[tuple[int, Tensor, list[int]]] = field(default_factory=list)
    # Per stage (decoder layer, [B, S] bool over the prefill sequence): the visual tokens present from that
    # layer on (what `Stats.llm_visual_kept` reports).
    visual_kept: list[tuple[int, Tensor]] = field(default_factory=list)
    # The stages' checks of their inputs (finite values), recorded on the device and read by `finish_prefill`.
    checks: DeviceChecks = field(default_factory=DeviceChecks)


def format_mask(allowed: Tensor, impl: str, dtype: torch.dtype) -> Tensor:
    """A [B, 1, q, kv] bool 'may attend' mask in the form the attention implementation expects."""
    if impl.startswith("flash"):
        return allowed[:, 0, -1].long()  # 2-D key padding mask; the kernel applies causality itself
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed


class DecoderPruner:
    """Applies one LLM-side method's stages to a decoder's layers for prefill + decode."""

    def __init__(self, spec: MethodSpec, options: dict[str, Any], num_layers: int, attn_impl: str, cache_kw: str):
        self.spec = spec
        self.cache_kw = cache_kw  # the decoder layers' KV-cache keyword (visprune.compat.cache_keyword)
        self.options = {k: v for k, v in options.items() if k in _own_options(spec)}
        self.stage_layers = tuple(spec.layers(options))
        requests = spec.signals(options)
        self.row_hints = {name: req.rows for name, req in requests.items()}
        self.full_q = False  # True computes every query row (a reference for tests)
        # signal_plan[layer] = [(stage, name, kind)]: compute `kind` from that layer's input for `stage`.
        self.signal_plan: dict[int, list[tuple[int, str, str]]] = {}
        for stage, stage_layer in enumerate(self.stage_layers):
            for name, req in requests.items():
                at = req.layers[stage] if len(req.layers) > 1 else (req.layers[0] if req.layers else stage_layer)
                prev = self.stage_layers[stage - 1] if stage else 0
                if not prev <= at <= stage_layer:
                    raise ValueError(
                        f"{spec.name}: stage {stage} prunes at layer {stage_layer} but reads {name!r} at layer {at}; "
                        f"signals must come from layers {prev}..{stage_layer}"
                    )
                self.signal_plan.setdefault(at, []).append((stage, name, req.kind))
        self.first_layer = min(min(self.signal_plan, default=self.stage_layers[0]), self.stage_layers[0])
        self.num_layers = num_layers
        self.attn_impl = attn_impl
        self.defer_finish = False  # True: the prefill's end does not read its counts; the caller `finish_prefill`s
        self.state = PrunerState()

    def begin(
        self,
        layout: TokenLayout,
        real_tokens: list[int] | None = None,
        visual_tokens: list[int] | None = None,
        width_multiple: int = 1,
    ) -> None:
        """Arm the pruner for the next prefill over a sequence with this layout (`real_tokens`: its real tokens
        per sample, when the caller knows them on the host; otherwise read from the layout; `visual_tokens`:
        its image tokens per sample, when the caller knows them on the host: a method with a `visual_kept`
        rule then prunes without reading the device; `width_multiple`: the launch-free path's prompt bucket,
        to which the stages planned that way pad their sequences, so that the prompts of one bucket share the
        prefill and decode graphs)."""
        if real_tokens is None:
            real_tokens = layout.attention_mask.sum(1).tolist()
        if visual_tokens is not None and layout.text_rows is None:
            text = max((n - v for n, v in zip(real_tokens, visual_tokens, strict=True)), default=0)
            text = min(round_up(text, width_multiple), layout.attention_mask.shape[1])
            layout = dataclasses.replace(layout, text_rows=text)
        self.state = PrunerState(
            layout=layout,
            prefill_layout=layout,
            phase="armed",
            real_tokens=list(real_tokens),
            width_multiple=width_multiple,
            host_visual=None if visual_tokens is None else list(visual_tokens),
        )

    def model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        st = self.state
        if st.phase == "armed":
            st.phase = "prefill"
            embeds = kwargs.get("inputs_embeds")
            if embeds is not None:
                self._expand(embeds.shape[0])
        elif st.phase == "prefill":
            st.phase = "decode"

    def _expand(self, rows: int) -> None:
        """Match the layout to a batch that generate expanded (beams, num_return_sequences): each
        sample's rows are repeated in place, as generate's repeat_interleave does."""
        st = self.state
        b = st.layout.attention_mask.shape[0]
        if rows == b:
            return
        if rows % b:
            raise InputError(
                f"the language model received {rows} rows for a batch of {b} prompts; pass one row per prompt"
            )
        r = rows // b
        masks = (t.repeat_interleave(r, dim=0) for t in _layout_masks(st.layout))
        st.layout = TokenLayout(*masks, text_rows=st.layout.text_rows)
        st.prefill_layout = st.layout
        st.real_tokens = [n for n in st.real_tokens for _ in range(r)]
        st.plan = None
        if st.host_visual is not None:
            st.host_visual = [n for n in st.host_visual for _ in range(r)]
        st.rows_per_sample = r

    def model_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.state.phase == "prefill" and not self.defer_finish:
            self.finish_prefill()

    def finish_prefill(self) -> None:
        """Check the stages' inputs were finite and each planned stage's counts against its plan, and record
        the tokens per layer (host reads of the prefill's results: at its end, or after its graph on the
        launch-free path)."""
        self.state.checks.verify()
        self._check_planned()
        kept = {id(g): g.valid.sum(1).tolist() for g in self.state.groups}  # one read per stage, not per layer
        per_layer = []
        for layer in range(self.num_layers):
            group = self._group_for(layer)
            per_layer.append(self.state.real_tokens if group is None else kept[id(group)])
        rows = [list(x) for x in zip(*per_layer, strict=True)]
        self.state.tokens_per_layer = rows[:: self.state.rows_per_sample]

    def _group_for(self, layer: int) -> _Group | None:
        found = None
        for g in self.state.groups:
            if g.start_layer <= layer:
                found = g
        return found

    def layer_pre_hook(self, layer_idx: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        st = self.state
        if st.phase == "prefill":
            hidden = args[0] if args else kwargs["hidden_states"]
            plan = self.signal_plan.get(layer_idx, [])
            stage = self.stage_layers.index(layer_idx) if layer_idx in self.stage_layers else None
            # Signals for this layer's own stage (or earlier) come from the sequence before it prunes;
            # signals for a LATER stage read at this same layer come from the pruned sequence.
            before = [p for p in plan if stage is None or p[0] <= stage]
            after = [p for p in plan if stage is not None and p[0] > stage]
            if before:
                self._collect(layer_idx, module, hidden, kwargs, before)
            if stage is not None:
                hidden = self._prune(layer_idx, hidden, kwargs)
                args, kwargs = _set_hidden(args, kwargs, hidden)
                if after:
                    self._collect(layer_idx, module, hidden, kwargs, after)
            group = self._group_for(layer_idx)
            if group is not None:
                kwargs["attention_mask"] = group.prefill_mask
                cache = kwargs.get(self.cache_kw)
                width = hidden.shape[1]
                keys = attended_keys(cache, layer_idx, width) if cache is not None else width
                if keys != width:  # a static cache: its unfilled slots must be hidden too
                    kwargs["attention_mask"] = self._step_mask(group.valid, 0, width, keys, hidden.dtype)
                kwargs["position_embeddings"] = group.position_embeddings
                if group.position_ids is not None:
                    kwargs["position_ids"] = group.position_ids
        elif st.phase == "decode":
            group = self._group_for(layer_idx)
            if group is not None:
                hidden = args[0] if args else kwargs["hidden_states"]
                cache = kwargs.get(self.cache_kw)
                if cache is None:
                    raise VisPruneError(
                        "a decode step after an LLM-side prune reached the decoder without its KV cache; "
                        "LLM-side methods prune the cache at prefill, so generate with use_cache=True"
                    )
                past = filled_length(cache, layer_idx)  # a device tensor for a static cache: no host read
                q_len = hidden.shape[1]
                keys = attended_keys(cache, layer_idx, q_len)
                growing = isinstance(past, int) and keys == past + q_len
                if group.all_valid and growing and q_len == 1 and self.attn_impl != "eager":
                    kwargs["attention_mask"] = None  # one new token over a padding-free cache: nothing to hide
                else:
                    kwargs["attention_mask"] = self._step_mask(group.valid, past, q_len, keys, hidden.dtype)
        return args, kwargs

    def _step_mask(self, valid: Tensor, past: int | Tensor, q_len: int, keys: int, dtype: torch.dtype) -> Tensor:
        """Mask for `q_len` tokens entering at position `past` (an int, or a 0-dim device tensor) of a group's
        cache with `keys` key slots: the group's kept prompt tokens (`valid` [B, S_g]) and every token fed
        since, causally; unfilled slots of a static cache hidden; each query sees itself (so padding rows stay
        finite). Its shapes depend on `q_len` and `keys` only."""
        s_g = valid.shape[1]
        k_pos = torch.arange(keys, device=valid.device)
        fed = k_pos < past + q_len  # the slots filled once these tokens are written
        real = torch.where(k_pos < s_g, nn.functional.pad(valid, (0, keys - s_g)), fed)  # [B, keys]
        q_pos = (torch.arange(q_len, device=valid.device) + past)[:, None]
        k_pos = k_pos[None, :]
        allowed = (real[:, None, None, :] & (k_pos <= q_pos)[None, None]) | (k_pos == q_pos)[None, None]
        return format_mask(allowed, self.attn_impl, dtype)

    def _collect(
        self, layer_idx: int, module: nn.Module, hidden: Tensor, kwargs: dict, plan: list[tuple[int, str, str]]
    ) -> None:
        """Compute the signals in `plan` from this layer's input (q/k with this layer's projections)."""
        prev = self.state.groups[-1] if self.state.groups else None
        pos_emb = kwargs["position_embeddings"] if prev is None else prev.position_embeddings
        kinds = {kind for _, _, kind in plan}
        q = k = None
        if kinds & {"q", "k"}:
            b = hidden.shape[0]
            rows = self._q_rows(plan) if "q" in kinds else None
            q, k = layer_qk(module, hidden, tuple(t.expand(b, -1, -1) for t in pos_emb), rows)
        for _, name, kind in plan:
            self.state.signals[name] = {"q": q, "k": k, "hidden": hidden}[kind]

    def _q_rows(self, plan: list[tuple[int, str, str]]) -> Tensor | None:
        """[B, R] the query rows the planned "q" signals read (None: all rows), from their `rows` hint."""
        hints = {self.row_hints[name] for _, name, kind in plan if kind == "q"}
        if self.full_q or len(hints) != 1 or "all" in hints:
            return None
        layout = self.state.layout
        hint = hints.pop()
        if hint == "last":
            return layout.last_index.clamp(min=0).unsqueeze(1)
        mask = query_or_last(layout) if hint == "query" else layout.attention_mask & ~layout.visual
        rows, _ = rows_from_mask(mask, layout.text_rows)
        return rows

    def _prune(self, layer_idx: int, hidden: Tensor, kwargs: dict) -> Tensor:
        st = self.state
        layout = st.layout
        prev = st.groups[-1] if st.groups else None
        pos_emb = kwargs["position_embeddings"] if prev is None else prev.position_embeddings
        b, s, _ = hidden.shape
        signals, st.signals = st.signals, {}
        stage = self.stage_layers.index(layer_idx)
        with deferred_device_checks(st.checks):  # read at the end of the prefill (`finish_prefill`)
            keep = self.spec.fn(layout=layout, stage=stage, **signals, **self.options)
        keep = keep & layout.attention_mask

        counts = keep.sum(1)
        planned = self._plan_on_host(stage)
        if planned is None:
            width = int(counts.max())  # a host read: the new sequence length
        else:  # the method's count rule gave it on the host; `_check_planned` compares at the prefill's end
            width = min(round_up(max(planned), st.width_multiple), s)
            st.planned.append((layer_idx, counts, planned))
        # (the clamp only matters if a method's rule and its mask disagree: no out-of-range slot before the check)
        slot = (width - counts.unsqueeze(1) + keep.long().cumsum(1) - 1).clamp(0, width)
        slot = torch.where(keep, slot, width)  # dropped tokens go to a discarded extra column
        index = torch.zeros(b, width + 1, dtype=torch.long, device=hidden.device)
        index.scatter_(1, slot, torch.arange(s, device=hidden.device).expand(b, s))
        index = index[:, :width]
        valid = torch.arange(width, device=hidden.device).unsqueeze(0) >= (width - counts).unsqueeze(1)
        index = torch.where(valid, index, 0)

        cos, sin = (t.expand(b, -1, -1) for t in pos_emb)
        gather3 = lambda t: t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
        position_ids = kwargs.get("position_ids") if prev is None else prev.position_ids
        new_pos_ids = None
        if isinstance(position_ids, Tensor):
            new_pos_ids = position_ids.expand(b, -1).gather(1, index)
        base_index = index if prev is None else prev.index.gather(1, index)
        first = st.prefill_layout
        width0 = first.visual.shape[1]
        present = torch.zeros(b, width0 + 1, dtype=torch.bool, device=hidden.device)
        present.scatter_(1, torch.where(valid, base_index, width0), True)
        st.visual_kept.append((layer_idx, present[:, :width0] & first.visual & first.attention_mask))

        # (in a bucketed prefill a stage always masks, so that a row that happens to fill it needs no other graph)
        all_valid = bool(valid.all()) if planned is None else min(planned) == width and st.width_multiple == 1
        plain = all_valid and self.attn_impl != "eager"
        mask = None if plain else self._step_mask(valid, 0, width, width, hidden.dtype)

        sub = layout.subset(index)
        st.layout = TokenLayout(
            attention_mask=sub.attention_mask & valid,
            visual=sub.visual & valid,
            query=sub.query & valid,
            system=sub.system & valid,
            text_rows=layout.text_rows,  # stages prune image tokens only
        )
        st.groups.append(
            _Group(
                start_layer=layer_idx,
                index=base_index,
                valid=valid,
                prefill_mask=mask,
                position_embeddings=(gather3(cos), gather3(sin)),
                position_ids=new_pos_ids,
                all_valid=all_valid,
            )
        )
        return gather3(hidden)

    def _plan_on_host(self, stage: int) -> list[int] | None:
        """The real tokens per sample after `stage`, from the host's counts and the method's `visual_kept` rule;
        None where the method has no rule or the counts are not known."""
        plan = self._host_plan()
        return None if plan is None else plan[stage]

    def _host_plan(self) -> list[list[int]] | None:
        """The real tokens per sample after each stage (every real non-image token stays; each stage keeps the
        image tokens its rule gives of those the previous one kept), or None (no rule, counts not known)."""
        st = self.state
        rule = self.spec.visual_kept
        if st.plan is None and rule is not None and st.host_visual is not None:
            tokens, visual, plan = list(st.real_tokens), list(st.host_visual), []
            for stage in range(len(self.stage_layers)):
                kept = rule(torch.tensor(visual, dtype=torch.long), self.options, stage)
                if kept is None:  # these options decide the counts from the data
                    return None
                tokens = [n - v + k for n, v, k in zip(tokens, visual, kept.tolist(), strict=True)]
                visual = kept.tolist()
                plan.append(tokens)
            st.plan = plan
        return st.plan

    def _check_planned(self) -> None:
        """Each stage planned on the host kept what its keep mask kept (one read, at the end of the prefill)."""
        planned, self.state.planned = self.state.planned, []
        for layer, counts, expected in planned:
            kept = counts.tolist()
            if kept != expected:
                raise VisPruneError(
                    f"{self.spec.name} kept {kept} tokens per sample at decoder layer {layer} where its count rule "
                    f"(visual_kept) planned {expected}: the method's function and its rule disagree, a bug in the "
                    "method; please report it"
                )

    # ----- the launch-free path's CUDA graphs ------------------------------------------------------------
    # A graph replays the device work of a prefill or decode step, not this pruner's Python: the host values
    # it was captured with are part of its key, the tensors it reads from this pruner's state are its inputs
    # (copied into its buffers on every replay), and what it leaves in that state comes back as its outputs.

    @property
    def capturable(self) -> bool:
        """Whether prefill and decode steps need nothing from the device on the host: a count rule, and the
        image tokens known on the host (`begin`'s visual_tokens), so that every stage is planned there."""
        return self._host_plan() is not None

    def graph_key(self, piece: str) -> tuple:
        """The host values a captured `piece` ("prefill" or "decode") depends on beyond its inputs' shapes: each
        stage's planned width and whether it has padding slots, and the text-row bound."""
        st = self.state
        if piece == "decode":
            return tuple((g.start_layer, g.all_valid) for g in st.groups)
        widths, s = [], st.layout.attention_mask.shape[1]
        for p in self._host_plan() or ():
            s = min(round_up(max(p), st.width_multiple), s)  # as `_prune` sizes the stage
            widths.append((s, min(p) == s and st.width_multiple == 1))
        return st.layout.text_rows, tuple(widths)

    def graph_inputs(self, piece: str) -> list[Tensor]:
        """The tensors of this pruner's state a `piece` reads: the prefill's token layout, the decode steps'
        kept-token masks."""
        if piece == "decode":
            return [g.valid for g in self.state.groups]
        return list(_layout_masks(self.state.layout))

    def bind_graph_inputs(self, piece: str, tensors: Sequence[Tensor]) -> None:
        """Read `graph_inputs` from `tensors` (a graph's buffers) in the call that is captured. The prefill
        starts from the armed state, as every call of a capture (its warm-up too) is a whole prefill."""
        st = self.state
        if piece == "decode":
            st.groups = [dataclasses.replace(g, valid=t) for g, t in zip(st.groups, tensors, strict=True)]
            return
        layout = TokenLayout(*tensors, text_rows=st.prefill_layout.text_rows)
        self.begin(layout, st.real_tokens, st.host_visual, st.width_multiple)
        self.state.plan = st.plan  # the same counts: the host's plan holds

    def graph_outputs(self, piece: str) -> Any:
        """What a captured `piece` leaves in this pruner's state, for `adopt_graph_outputs` after each replay."""
        if piece == "decode":
            return None
        st = self.state
        return st.groups, st.visual_kept, [counts for _, counts, _ in st.planned], st.checks.take_since(0)

    def adopt_graph_outputs(self, piece: str, outputs: Any) -> None:
        """Take what a replay of `piece` computed (copies of `graph_outputs`) into the state, as if the step
        had run here; the planned counts are this call's, for `finish_prefill` to check."""
        if piece == "decode":
            return
        groups, visual_kept, counts, checks = outputs
        st = self.state
        st.checks.extend(checks)
        st.groups, st.visual_kept, st.phase = groups, visual_kept, "prefill"
        st.planned = [(g.start_layer, c, p) for g, c, p in zip(groups, counts, self._host_plan(), strict=True)]

    def sequence_at(self, layer: int) -> tuple[Tensor, Tensor] | None:
        """(index, valid) of the sequence decoder layer `layer` runs on at prefill into the prefill sequence,
        or None while it is the whole prefill sequence."""
        group = self._group_for(layer)
        return None if group is None else (group.index, group.valid)

    @property
    def final_index(self) -> tuple[Tensor, Tensor] | None:
        """(index, valid) of the last stage's sequence into the prefill sequence, or None if none ran."""
        if not self.state.groups:
            return None
        g = self.state.groups[-1]
        return g.index, g.valid


def _own_options(spec: MethodSpec) -> set[str]:
    """The options the LLM stage function itself takes (a two-stage method also carries its encoder's)."""
    return {p.name for p in inspect.signature(spec.fn).parameters.values() if p.kind is p.KEYWORD_ONLY}


def _layout_masks(layout: TokenLayout) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return layout.attention_mask, layout.visual, layout.query, layout.system


def _set_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs
