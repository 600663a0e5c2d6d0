"""CDPruner (Zhang et al., NeurIPS 2025, arXiv 2506.10967): keep the visual tokens of maximal conditional
diversity. A determinantal point process over the tokens, whose kernel is their pairwise similarity
weighted by each token's relevance to the instruction, picks the budget by greedy MAP inference. It
needs no attention map.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from visprune.methods.base import Placement, Reduction, SignalRequest, select_tokens
from visprune.methods.budget_rules import TOKENS
from visprune.methods.checks import check_budgeted_features, check_count
from visprune.methods.cls_topk import check_signal
from visprune.methods.graphs import fused, replayed, row_at
from visprune.methods.registry import register
from visprune.methods.similarity import cosine_similarity, pairwise_cosine

EPS = 1e-6  # the official code's offset in the relevance normalisation; also the floor of a pivot variance


def check_options(*, budget: Any) -> None:
    """CDPruner's option: a budget >= 1 (the bound against N needs the data)."""
    check_count(budget, "budget", 1)


def conditional_kernel(projected: Tensor, prompt: Tensor) -> Tensor:
    """[B, N, N] float32 kernel r_i S_ij r_j: S the cosine similarity of the tokens `projected` [B, N, D],
    r each token's cosine similarity to the instruction vector `prompt` [B, D], min-max normalised per
    image to (0, 1] ((r - min + EPS) / (max - min); all ones when the tokens are equally relevant or
    there is no instruction, a zero prompt)."""
    similarity = pairwise_cosine(projected)
    relevance = cosine_similarity(projected, prompt.unsqueeze(1)).squeeze(-1)  # [B, N]
    low, high = relevance.amin(dim=1, keepdim=True), relevance.amax(dim=1, keepdim=True)
    relevance = (relevance - low + EPS) / (high - low).clamp(min=EPS)
    return relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)


def greedy_map(kernel: Tensor, k: int) -> Tensor:
    """[B, k] indices in selection order: greedy MAP inference of the DPP with `kernel` [B, N, N] (each step
    adds the token that most increases log det of the selected submatrix), by the incremental Cholesky
    update of Chen et al. (NeurIPS 2018), batched over images: one step per selected token, O(N k) each.

    d_j^2 is token j's variance left unexplained by the selection (the Schur complement); the step
    takes the largest (ties to the lowest index), appends its Cholesky row e = (L_j - c_j^T C) / d_j
    and subtracts e^2 from every d^2. A taken token is never taken again; when the kernel's rank is
    exhausted (every d^2 <= 0, duplicate tokens) the division uses EPS and the order stays greedy.
    """
    b, n, _ = kernel.shape
    variance = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # d^2 [B, N]
    rows = kernel.new_zeros(k, b, n)  # the Cholesky rows of the selected tokens, c_i [B, N]; zero until chosen
    taken = torch.zeros(b, n, dtype=torch.bool, device=kernel.device)
    chosen = []
    for i in range(k):
        j, rows[i], variance, taken = _cholesky_step(kernel, rows, variance, taken)
        chosen.append(j)
    return torch.stack(chosen, dim=1)


@fused
def _cholesky_step(kernel: Tensor, rows: Tensor, variance: Tensor, taken: Tensor) -> tuple[Tensor, ...]:
    """One greedy step: the token of largest d^2, its Cholesky row e, the new d^2 and taken mask. The rows
    not chosen yet are zero, so summing over all of them is the sum over the selected ones (one shape for
    every step: a compiled step is specialised to it)."""
    j = variance.masked_fill(taken, float("-inf")).argmax(dim=1)
    selected_j = rows.gather(2, j.view(1, -1, 1).expand(rows.shape[0], -1, 1))  # c_i[j] [k, B, 1]
    row = row_at(kernel, j) - (selected_j * rows).sum(dim=0)
    e = row / variance.gather(1, j.unsqueeze(1)).clamp(min=EPS).sqrt()
    return j, e, variance - e.square(), taken.scatter(1, j.unsqueeze(1), True)


def conditional_selection(projected: Tensor, prompt: Tensor, k: int) -> Tensor:
    """[B, k] indices: `greedy_map` of `conditional_kernel(projected, prompt)`; no host synchronisation
    (`graphs.replayed` captures it)."""
    return greedy_map(conditional_kernel(projected, prompt), k)


@register(
    "cdpruner",
    description="CDPruner: the most conditionally diverse tokens, a DPP over the projected tokens weighted by "
    "their relevance to the prompt, greedy MAP (fixed K, no attention map)",
    placement=Placement.ENCODER,
    adaptive=False,
    signals=lambda o: {"projected": SignalRequest("projected"), "prompt": SignalRequest("prompt")},
    check=check_options,
    budget_rule=TOKENS,
)
def cdpruner(
    features: Tensor,
    *,
    projected: Tensor,
    prompt: Tensor,
    grid: tuple[int, int] | None = None,
    budget: int = 64,
) -> list[Reduction]:
    """Keep `budget` tokens per image chosen by `greedy_map` on `conditional_kernel(projected, prompt)`:
    projected [B, N, D] the tokens as the LLM receives them (the projector applied to every row, as the
    official code computes the similarity), prompt [B, D] the instruction of each image
    (`prompts.prompt_vectors`: the mean of the L2-normalised LLM input embeddings of the prompt's text
    after the image). features [B, N, C] are what is kept; grid is only validated.

    Output: the kept tokens in spatial order, unchanged; `assignment` marks the dropped ones with -1.

    Deviations from the official code (Theia-4869/CDPruner, LLaVA): there, relevance is the NEGATED
    cosine similarity between CLIP's projected patch embeddings and CLIP text-encoder embeddings of the
    instruction, min-max normalised over the whole batch. A Hugging Face LLaVA (or Qwen-VL) carries no
    CLIP text tower, so here relevance is the cosine similarity, in the LLM's input space, between each
    projected token and the instruction's token embeddings (not negated: the official sign is tied to
    CLIP's patch embeddings), normalised per image so that an image's selection does not depend on the
    rest of the batch. The official code's optional theta re-weighting is not offered (it ships
    disabled). Exactly `budget` tokens per image of any batch; duplicates handled (see greedy_map).

    Options:
        budget: tokens kept per image (default 64), 1 <= budget <= N.
    """
    check_options(budget=budget)
    b, n, k = check_budgeted_features(features, grid, budget)
    check_signal(projected, "projected", (b, n, None), features)
    check_signal(prompt, "prompt", (b, projected.shape[2]), features)
    return select_tokens(features, replayed(conditional_selection, projected, prompt, k=k))
