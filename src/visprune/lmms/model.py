"""visprune's lmms-eval model (`lmms-eval --model visprune --model_args pretrained=...,method=...`).

It loads the checkpoint with transformers, applies the method with `visprune.apply`, and answers
`generate_until` requests in batches in which every image keeps its own visual-token count. It is a
"simple" lmms-eval model (the task's doc_to_text / doc_to_visual give each prompt's text and images).
Under `accelerate launch` every process holds one model on its own device and answers the documents
lmms-eval deals to its rank; the visual-token and prefill numbers are summed over the processes.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger
from PIL import Image
from tqdm import tqdm

import visprune
from visprune.errors import InputError
from visprune.lmms import args, loading, records
from visprune.lmms.generation import Generation, generation, run_batch
from visprune.lmms.records import Tally


class VisPrune(lmms):
    """A Hugging Face multimodal model with a visprune method applied, for lmms-eval."""

    is_simple = True

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        self.settings = args.parse(model_args)
        s = self.settings
        loaded = loading.load(s.pretrained, s.device, s.dtype, s.attn_implementation)
        self._model, self.processor, self._device = loaded.model, loaded.processor, loaded.device
        self.accelerator = loaded.accelerator
        self._rank, self._world_size = loaded.rank, loaded.world_size
        method, options = args.resolve(s, self._model)
        self.handle = visprune.apply(self._model, method, **s.apply_kwargs(), **options)
        self.totals: dict[str, Tally] = {}
        if self._rank == 0:
            logger.info(f"visprune: {list(self.handle.methods)} with {self.handle.options} on {self._device}")

    @property
    def model(self) -> Any:
        return self._model

    @property
    def device(self) -> Any:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def chat_template(self) -> str | None:
        return getattr(self.processor, "chat_template", None)

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answer every request, in batches of one task and one set of generation kwargs, in request order."""
        groups: OrderedDict[tuple[str, str, str], list[int]] = OrderedDict()
        for index, request in enumerate(requests):
            _, gen_kwargs, _, _, task, split = request.args
            key = (task, split, json.dumps(gen_kwargs, sort_keys=True, default=str))
            groups.setdefault(key, []).append(index)
        out: list[GenerationResult | None] = [None] * len(requests)
        call: dict[str, Tally] = {}
        size = self.settings.batch_size
        bar = tqdm(total=len(requests), disable=self._rank != 0, desc="visprune answering")
        for (task, split, _), indices in groups.items():
            gen = generation(dict(requests[indices[0]].args[1]))
            for start in range(0, len(indices), size):
                chunk = [requests[i] for i in indices[start : start + size]]
                result = self._batch(chunk, task, split, gen)
                keep = [not (r.metadata or {}).get("__padding_only__") for r in chunk]
                call.setdefault(task, Tally()).add(records.tally(result, keep))
                for i, answer in zip(indices[start : start + size], result.answers, strict=True):
                    counts = TokenCounts(input_tokens=answer.prefill_tokens, output_tokens=answer.new_tokens)
                    out[i] = GenerationResult(text=answer.text, token_counts=counts)
                bar.update(len(chunk))
        bar.close()
        self._report(call)
        return out  # type: ignore[return-value]

    def _batch(self, chunk: list[Instance], task: str, split: str, gen: Generation) -> Any:
        texts, images = [], []
        for request in chunk:
            context, _, doc_to_visual, doc_id, _, _ = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
            visuals = list(visuals or [])
            for v in visuals:
                if not isinstance(v, Image.Image):
                    raise InputError(
                        f"task {task!r} gave a {type(v).__name__} as a visual; visprune's lmms-eval model takes images"
                    )
            texts.append(context)
            images.append([v.convert("RGB") for v in visuals])
        return run_batch(self._model, self.processor, self.handle, texts, images, gen)

    def _report(self, call: dict[str, Tally]) -> None:
        """Sum this call's tallies over the processes; the main one logs them for lmms-eval's summary and
        rewrites the record file."""
        parts: list[Any] = [records.to_dicts(call)]
        if self._world_size > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self._world_size
            dist.all_gather_object(gathered, parts[0])
            parts = gathered
        if self._rank != 0:
            return
        merged = records.merge(parts)
        for task, t in merged.items():
            self.totals.setdefault(task, Tally()).add(t)
            log_metrics(**records.metrics(task, t))
            summary = ", ".join(f"{k} {v:.1f}" for k, v in t.summary().items())
            logger.info(f"visprune {task}: {summary}")
        if self.settings.record:
            data = records.record(self.handle.methods, self.handle.options, self.settings.apply_kwargs(), self.totals)
            data.update(pretrained=self.settings.pretrained, tokens=self.settings.tokens)
            path = Path(self.settings.record)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1))

    def clean(self) -> None:
        """Undo the patch before lmms-eval frees the model (the handle would otherwise keep it alive)."""
        if getattr(self, "handle", None) is not None:
            visprune.remove(self.handle.model)
            self.handle = None
        super().clean()

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        tasks = sorted({r.task_name for r in requests})
        raise InputError(
            f"visprune's lmms-eval model answers generate_until tasks; {tasks} ask for loglikelihood scores "
            "(output_type loglikelihood / multiple_choice), which it does not compute"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        tasks = sorted({r.task_name for r in requests})
        raise InputError(
            f"visprune's lmms-eval model answers single-round generate_until tasks; {tasks} are multi-round"
        )
