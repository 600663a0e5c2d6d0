"""The synthetic suite as a local lmms-eval task (`visprune_synth`): no network, the same items and the same
scoring as `visprune eval --task synth`.

`write_task` renders the items of a split (seed-defined, as `visprune eval` chooses them) into one parquet
file, images embedded as PNG (lossless, so the pixels are the ones `visprune eval` renders), and puts the
task's YAML beside it; lmms-eval resolves the YAML's relative `data_files` against the YAML's folder, so the
folder can be moved. The functions below are what the YAML names: the prompt text (the question and the
suite's answer instruction, which the model's chat template wraps into the prompt `visprune eval` uses) and
the scoring (`visprune.synth.score`), overall and per question family.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

from visprune.errors import InputError
from visprune.synth import FAMILIES, load_split, score
from visprune.synth.vocab import ANSWER_INSTRUCTION

TASK = "visprune_synth"
YAML = Path(__file__).resolve().parent / "tasks" / f"{TASK}.yaml"
DATA = f"{TASK}.parquet"


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The item's image (RGB)."""
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """The question and the answer instruction (pre_prompt / post_prompt from the YAML replace them)."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', ' ' + ANSWER_INSTRUCTION)}"


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float | None]:
    """1.0 / 0.0 for `accuracy` and for the item's family (None for the other families)."""
    correct = float(score(results[0], doc["answer"]))
    return {"accuracy": correct, **{f: (correct if f == doc["family"] else None) for f in FAMILIES}}


def mean_of_answered(values: list[float | None]) -> float:
    """The mean over the items of one family (the others give None); 0 when the slice has none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else 0.0


def write_task(out: Path, split: str = "test", limit: int | None = None, offset: int = 0) -> dict[str, Path]:
    """Render items `offset ..` of `split` (default: all of it, as `visprune eval`) into `out`/visprune_synth.parquet
    and copy the task YAML beside it; returns both paths."""
    try:
        import datasets
    except ImportError as err:
        raise InputError('writing the lmms-eval task needs the lmms extra: pip install "visprune[lmms]"') from err
    try:
        items = load_split(split, n=limit, offset=offset)
    except (ValueError, IndexError) as err:
        raise InputError(str(err)) from err
    rows: dict[str, list[Any]] = {k: [] for k in ("index", "seed", "image", "question", "answer", "family", "subtype")}
    for number, item in enumerate(items):
        png = io.BytesIO()
        item.image().save(png, format="PNG")
        rows["index"].append(offset + number)
        rows["seed"].append(item.seed)
        rows["image"].append({"bytes": png.getvalue(), "path": None})
        rows["question"].append(item.text)
        rows["answer"].append(item.answer)
        rows["family"].append(item.family)
        rows["subtype"].append(item.subtype)
    features = datasets.Features(
        {
            "index": datasets.Value("int64"),
            "seed": datasets.Value("int64"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "family": datasets.Value("string"),
            "subtype": datasets.Value("string"),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    data = out / DATA
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(data))
    yaml = out / YAML.name
    shutil.copyfile(YAML, yaml)
    return {"data": data, "yaml": yaml}
