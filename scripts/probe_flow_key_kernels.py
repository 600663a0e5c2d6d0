"""Probe (session 20, reverted with the kernel it measured): fused Triton kernels for FlowCut's per-row key terms
on a Qwen-VL block (each key against its own image's mean query, the per-image peaks, the value norms) against
a kernel that only reads k and v with the same access pattern, at Qwen2.5-VL-7B's batch 8 x 1008 px shapes.

    python scripts/probe_flow_key_kernels.py          # do_bench times (us) per variant and launch shape
    ncu --section SpeedOfLight --section Occupancy --section LaunchStats -k regex:"kernel_r|kernel_d" \
        python scripts/probe_flow_key_kernels.py ncu

Variants: A (a dynamic loop over the program's images, relaxed atomics), B (each row's mean query gathered,
peaks of the first and last image per program), C (B without peaks), D (B with the 80 columns read as 64 + 16,
no masked lanes), E (tensor-core dots against three bf16 parts of the mean queries), R (k and v read only).
"""

import functools
import sys

import torch
import triton
import triton.language as tl

from visprune.models import qwen_tower


@triton.jit
def kernel_a(
    k_ptr,
    v_ptr,
    mean_q_ptr,
    image_ptr,
    part_ptr,
    logits_ptr,
    norms_ptr,
    peaks_ptr,
    rows,
    k_row_stride,
    v_row_stride,
    images,
    scale,
    HEADS: tl.constexpr,
    WIDTH: tl.constexpr,
    K_HEAD_STRIDE: tl.constexpr,
    V_HEAD_STRIDE: tl.constexpr,
    HAS_PART: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_WIDTH: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.arange(0, BLOCK_WIDTH)
    row_ok = row < rows
    tile_ok = row_ok[:, None] & (col < WIDTH)[None, :]
    group = tl.load(image_ptr + row, mask=row_ok, other=0)
    counted = row_ok
    if HAS_PART:
        counted = counted & (tl.load(part_ptr + row, mask=row_ok, other=0) != 0)
    first = tl.min(tl.where(row_ok, group, images), axis=0)
    last = tl.max(tl.where(row_ok, group, -1), axis=0)
    wide_row = row.to(tl.int64)[:, None]
    k_at = k_ptr + wide_row * k_row_stride + col[None, :]
    v_at = v_ptr + wide_row * v_row_stride + col[None, :]
    value_sum = tl.zeros([BLOCK_ROWS, BLOCK_WIDTH], dtype=tl.float32)
    for head in tl.static_range(HEADS):
        keys = tl.load(k_at + head * K_HEAD_STRIDE, mask=tile_ok, other=0.0).to(tl.float32)
        value_sum += tl.load(v_at + head * V_HEAD_STRIDE, mask=tile_ok, other=0.0).to(tl.float32)
        logit = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for g in range(first, last + 1):
            query = tl.load(mean_q_ptr + (g * HEADS + head) * WIDTH + col, mask=col < WIDTH, other=0.0)
            dots = tl.sum(keys * query[None, :], axis=1) * scale
            mine = group == g
            logit = tl.where(mine, dots, logit)
            peak = tl.max(tl.where(mine & counted, dots, float("-inf")), axis=0)
            tl.atomic_max(peaks_ptr + head * images + g, peak, sem="relaxed")
        tl.store(logits_ptr + row.to(tl.int64) * HEADS + head, logit, mask=row_ok)
    tl.store(norms_ptr + row, tl.sum(tl.abs(value_sum), axis=1) / HEADS, mask=row_ok)


@triton.jit
def kernel_b(
    k_ptr,
    v_ptr,
    mean_q_ptr,
    image_ptr,
    part_ptr,
    logits_ptr,
    norms_ptr,
    peaks_ptr,
    rows,
    k_row_stride,
    v_row_stride,
    images,
    scale,
    HEADS: tl.constexpr,
    WIDTH: tl.constexpr,
    K_HEAD_STRIDE: tl.constexpr,
    V_HEAD_STRIDE: tl.constexpr,
    HAS_PART: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_WIDTH: tl.constexpr,
    PEAKS: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.arange(0, BLOCK_WIDTH)
    head_ids = tl.arange(0, HEADS)
    row_ok = row < rows
    tile_ok = row_ok[:, None] & (col < WIDTH)[None, :]
    group = tl.load(image_ptr + row, mask=row_ok, other=0)
    counted = row_ok
    if HAS_PART:
        counted = counted & (tl.load(part_ptr + row, mask=row_ok, other=0) != 0)
    first = tl.min(tl.where(row_ok, group, images), axis=0)
    last = tl.max(tl.where(row_ok, group, -1), axis=0)
    middle = counted & (group > first) & (group < last)
    wide_row = row.to(tl.int64)[:, None]
    k_at = k_ptr + wide_row * k_row_stride + col[None, :]
    v_at = v_ptr + wide_row * v_row_stride + col[None, :]
    q_at = mean_q_ptr + group[:, None] * (HEADS * WIDTH) + col[None, :]
    value_sum = tl.zeros([BLOCK_ROWS, BLOCK_WIDTH], dtype=tl.float32)
    logits = tl.zeros([BLOCK_ROWS, HEADS], dtype=tl.float32)
    peak_first = tl.full([HEADS], float("-inf"), tl.float32)
    peak_last = tl.full([HEADS], float("-inf"), tl.float32)
    for head in tl.static_range(HEADS):
        keys = tl.load(k_at + head * K_HEAD_STRIDE, mask=tile_ok, other=0.0).to(tl.float32)
        query = tl.load(q_at + head * WIDTH, mask=tile_ok, other=0.0)
        value_sum += tl.load(v_at + head * V_HEAD_STRIDE, mask=tile_ok, other=0.0).to(tl.float32)
        logit = tl.sum(keys * query, axis=1) * scale
        logits = tl.where(head_ids[None, :] == head, logit[:, None], logits)
        if PEAKS:
            pf = tl.max(tl.where(counted & (group == first), logit, float("-inf")), axis=0)
            pl = tl.max(tl.where(counted & (group == last), logit, float("-inf")), axis=0)
            peak_first = tl.where(head_ids == head, pf, peak_first)
            peak_last = tl.where(head_ids == head, pl, peak_last)
            tl.atomic_max(peaks_ptr + head * images + group, logit, mask=middle, sem="relaxed")
    tl.store(logits_ptr + row.to(tl.int64)[:, None] * HEADS + head_ids[None, :], logits, mask=row_ok[:, None])
    tl.store(norms_ptr + row, tl.sum(tl.abs(value_sum), axis=1) / HEADS, mask=row_ok)
    if PEAKS:
        tl.atomic_max(peaks_ptr + head_ids * images + first, peak_first, sem="relaxed")
        tl.atomic_max(peaks_ptr + head_ids * images + last, peak_last, sem="relaxed")


@triton.jit
def kernel_d(
    k_ptr,
    v_ptr,
    mean_q_ptr,
    image_ptr,
    part_ptr,
    logits_ptr,
    norms_ptr,
    peaks_ptr,
    rows,
    k_row_stride,
    v_row_stride,
    images,
    scale,
    HEADS: tl.constexpr,
    WIDTH: tl.constexpr,
    K_HEAD_STRIDE: tl.constexpr,
    V_HEAD_STRIDE: tl.constexpr,
    HAS_PART: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_WIDTH: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    ca = tl.arange(0, 64)
    cb = 64 + tl.arange(0, 16)
    head_ids = tl.arange(0, HEADS)
    row_ok = row < rows
    group = tl.load(image_ptr + row, mask=row_ok, other=0)
    counted = row_ok
    if HAS_PART:
        counted = counted & (tl.load(part_ptr + row, mask=row_ok, other=0) != 0)
    first = tl.min(tl.where(row_ok, group, images), axis=0)
    last = tl.max(tl.where(row_ok, group, -1), axis=0)
    middle = counted & (group > first) & (group < last)
    wide_row = row.to(tl.int64)[:, None]
    m = row_ok[:, None]
    k_at = k_ptr + wide_row * k_row_stride
    v_at = v_ptr + wide_row * v_row_stride
    q_at = mean_q_ptr + group[:, None] * (HEADS * WIDTH)
    va = tl.zeros([BLOCK_ROWS, 64], dtype=tl.float32)
    vb = tl.zeros([BLOCK_ROWS, 16], dtype=tl.float32)
    logits = tl.zeros([BLOCK_ROWS, HEADS], dtype=tl.float32)
    peak_first = tl.full([HEADS], float("-inf"), tl.float32)
    peak_last = tl.full([HEADS], float("-inf"), tl.float32)
    for head in tl.static_range(HEADS):
        ka = tl.load(k_at + head * K_HEAD_STRIDE + ca[None, :], mask=m, other=0.0).to(tl.float32)
        kb = tl.load(k_at + head * K_HEAD_STRIDE + cb[None, :], mask=m, other=0.0).to(tl.float32)
        qa = tl.load(q_at + head * WIDTH + ca[None, :], mask=m, other=0.0)
        qb = tl.load(q_at + head * WIDTH + cb[None, :], mask=m, other=0.0)
        va += tl.load(v_at + head * V_HEAD_STRIDE + ca[None, :], mask=m, other=0.0).to(tl.float32)
        vb += tl.load(v_at + head * V_HEAD_STRIDE + cb[None, :], mask=m, other=0.0).to(tl.float32)
        logit = (tl.sum(ka * qa, axis=1) + tl.sum(kb * qb, axis=1)) * scale
        logits = tl.where(head_ids[None, :] == head, logit[:, None], logits)
        pf = tl.max(tl.where(counted & (group == first), logit, float("-inf")), axis=0)
        pl = tl.max(tl.where(counted & (group == last), logit, float("-inf")), axis=0)
        peak_first = tl.where(head_ids == head, pf, peak_first)
        peak_last = tl.where(head_ids == head, pl, peak_last)
        tl.atomic_max(peaks_ptr + head * images + group, logit, mask=middle, sem="relaxed")
    tl.store(logits_ptr + row.to(tl.int64)[:, None] * HEADS + head_ids[None, :], logits, mask=row_ok[:, None])
    norm = tl.sum(tl.abs(va), axis=1) + tl.sum(tl.abs(vb), axis=1)
    tl.store(norms_ptr + row, norm / HEADS, mask=row_ok)
    tl.atomic_max(peaks_ptr + head_ids * images + first, peak_first, sem="relaxed")
    tl.atomic_max(peaks_ptr + head_ids * images + last, peak_last, sem="relaxed")


@triton.jit
def kernel_e(
    k_ptr,
    v_ptr,
    parts_ptr,
    image_ptr,
    part_ptr,
    logits_ptr,
    norms_ptr,
    peaks_ptr,
    rows,
    k_row_stride,
    v_row_stride,
    images,
    scale,
    HEADS: tl.constexpr,
    WIDTH: tl.constexpr,
    K_HEAD_STRIDE: tl.constexpr,
    V_HEAD_STRIDE: tl.constexpr,
    HAS_PART: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_WIDTH: tl.constexpr,
    IMAGE_COLUMNS: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    ca = tl.arange(0, 64)
    cb = 64 + tl.arange(0, 16)
    ic = tl.arange(0, IMAGE_COLUMNS)
    head_ids = tl.arange(0, HEADS)
    row_ok = row < rows
    group = tl.load(image_ptr + row, mask=row_ok, other=0)
    counted = row_ok
    if HAS_PART:
        counted = counted & (tl.load(part_ptr + row, mask=row_ok, other=0) != 0)
    first = tl.min(tl.where(row_ok, group, images), axis=0)
    last = tl.max(tl.where(row_ok, group, -1), axis=0)
    middle = counted & (group > first) & (group < last)
    own = group[:, None] == ic[None, :]
    wide_row = row.to(tl.int64)[:, None]
    m = row_ok[:, None]
    k_at = k_ptr + wide_row * k_row_stride
    v_at = v_ptr + wide_row * v_row_stride
    va = tl.zeros([BLOCK_ROWS, 64], dtype=tl.float32)
    vb = tl.zeros([BLOCK_ROWS, 16], dtype=tl.float32)
    logits = tl.zeros([BLOCK_ROWS, HEADS], dtype=tl.float32)
    peak_first = tl.full([HEADS], float("-inf"), tl.float32)
    peak_last = tl.full([HEADS], float("-inf"), tl.float32)
    for head in tl.static_range(HEADS):
        ka = tl.load(k_at + head * K_HEAD_STRIDE + ca[None, :], mask=m, other=0.0)
        kb = tl.load(k_at + head * K_HEAD_STRIDE + cb[None, :], mask=m, other=0.0)
        va += tl.load(v_at + head * V_HEAD_STRIDE + ca[None, :], mask=m, other=0.0).to(tl.float32)
        vb += tl.load(v_at + head * V_HEAD_STRIDE + cb[None, :], mask=m, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_ROWS, IMAGE_COLUMNS], dtype=tl.float32)
        for p in tl.static_range(3):
            base = parts_ptr + ((p * HEADS + head) * WIDTH) * IMAGE_COLUMNS
            ta = tl.load(base + ca[:, None] * IMAGE_COLUMNS + ic[None, :])
            tb = tl.load(base + cb[:, None] * IMAGE_COLUMNS + ic[None, :])
            acc = tl.dot(ka, ta, acc)
            acc = tl.dot(kb, tb, acc)
        logit = tl.sum(tl.where(own, acc, 0.0), axis=1) * scale
        logits = tl.where(head_ids[None, :] == head, logit[:, None], logits)
        pf = tl.max(tl.where(counted & (group == first), logit, float("-inf")), axis=0)
        pl = tl.max(tl.where(counted & (group == last), logit, float("-inf")), axis=0)
        peak_first = tl.where(head_ids == head, pf, peak_first)
        peak_last = tl.where(head_ids == head, pl, peak_last)
        tl.atomic_max(peaks_ptr + head * images + group, logit, mask=middle, sem="relaxed")
    tl.store(logits_ptr + row.to(tl.int64)[:, None] * HEADS + head_ids[None, :], logits, mask=row_ok[:, None])
    norm = tl.sum(tl.abs(va), axis=1) + tl.sum(tl.abs(vb), axis=1)
    tl.store(norms_ptr + row, norm / HEADS, mask=row_ok)
    tl.atomic_max(peaks_ptr + head_ids * images + first, peak_first, sem="relaxed")
    tl.atomic_max(peaks_ptr + head_ids * images + last, peak_last, sem="relaxed")


def e_parts(mq, dtype):
    images, heads, width = mq.shape
    cols = max(16, triton.next_power_of_2(images))
    parts, rest = [], mq.float()
    for _ in range(3):
        part = rest.to(dtype)
        parts.append(part)
        rest = rest - part.float()
    out = torch.zeros(3, heads, width, cols, dtype=dtype, device=mq.device)
    out[..., :images] = torch.stack(parts).permute(0, 2, 3, 1)
    return out, cols


def launch(kernel, k, v, mq, image, part, rows_per, warps, **extra):
    rows, heads, width = v.shape
    images = mq.shape[0]
    logits = torch.empty(rows, heads, dtype=torch.float32, device=k.device)
    norms = torch.empty(rows, dtype=torch.float32, device=k.device)
    peaks = torch.full((heads, images), float("-inf"), dtype=torch.float32, device=k.device)
    if kernel is kernel_e:
        mq, cols = e_parts(mq, k.dtype)
        extra = dict(extra, IMAGE_COLUMNS=cols)
    kernel[(triton.cdiv(rows, rows_per),)](
        k,
        v,
        mq,
        image,
        part,
        logits,
        norms,
        peaks,
        rows,
        k.stride(0),
        v.stride(0),
        images,
        0.1,
        HEADS=heads,
        WIDTH=width,
        K_HEAD_STRIDE=k.stride(1),
        V_HEAD_STRIDE=v.stride(1),
        HAS_PART=True,
        BLOCK_ROWS=rows_per,
        BLOCK_WIDTH=128,
        num_warps=warps,
        **extra,
    )
    return logits, norms, peaks


@triton.jit
def kernel_r(
    k_ptr,
    v_ptr,
    norms_ptr,
    rows,
    k_row_stride,
    v_row_stride,
    HEADS: tl.constexpr,
    K_HEAD_STRIDE: tl.constexpr,
    V_HEAD_STRIDE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    ca = tl.arange(0, 64)
    cb = 64 + tl.arange(0, 16)
    row_ok = row < rows
    m = row_ok[:, None]
    wide_row = row.to(tl.int64)[:, None]
    k_at = k_ptr + wide_row * k_row_stride
    v_at = v_ptr + wide_row * v_row_stride
    a = tl.zeros([BLOCK_ROWS, 64], dtype=tl.float32)
    b = tl.zeros([BLOCK_ROWS, 16], dtype=tl.float32)
    for head in tl.static_range(HEADS):
        a += tl.load(k_at + head * K_HEAD_STRIDE + ca[None, :], mask=m, other=0.0).to(tl.float32)
        b += tl.load(k_at + head * K_HEAD_STRIDE + cb[None, :], mask=m, other=0.0).to(tl.float32)
        a += tl.load(v_at + head * V_HEAD_STRIDE + ca[None, :], mask=m, other=0.0).to(tl.float32)
        b += tl.load(v_at + head * V_HEAD_STRIDE + cb[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(norms_ptr + row, tl.sum(a, axis=1) + tl.sum(b, axis=1), mask=row_ok)


ROWS, HEADS, WIDTH, IMAGES = 8 * 5184, 16, 80, 8
CONFIGS = [(16, 1), (16, 2), (32, 2), (32, 4), (64, 4), (64, 8)]


def main() -> None:
    from triton.testing import do_bench

    torch.manual_seed(0)
    d = torch.device("cuda")
    q, k, v = torch.randn(ROWS, 3, HEADS, WIDTH, device=d, dtype=torch.bfloat16).unbind(1)
    image = torch.arange(IMAGES, device=d).repeat_interleave(ROWS // IMAGES)
    part = torch.rand(ROWS, device=d) > 0.3
    _, wk = qwen_tower.widen(q, k, torch.where(part, 0.0, qwen_tower.KEY_BIAS))
    mq = torch.randn(IMAGES, HEADS, WIDTH, device=d)
    norms = torch.empty(ROWS, device=d)

    def read_only(rows_per: int, warps: int) -> None:
        kernel_r[(triton.cdiv(ROWS, rows_per),)](
            wk,
            v,
            norms,
            ROWS,
            wk.stride(0),
            v.stride(0),
            HEADS=HEADS,
            K_HEAD_STRIDE=wk.stride(1),
            V_HEAD_STRIDE=v.stride(1),
            BLOCK_ROWS=rows_per,
            num_warps=warps,
        )

    if sys.argv[1:] == ["ncu"]:
        read_only(16, 2)
        launch(kernel_d, wk, v, mq, image, part, 16, 2)
        torch.cuda.synchronize()
        return
    variants = {
        "A": (kernel_a, {}),
        "B": (kernel_b, {"PEAKS": True}),
        "C": (kernel_b, {"PEAKS": False}),
        "D": (kernel_d, {}),
        "E": (kernel_e, {}),
    }
    for rows_per, warps in CONFIGS:
        times = {"R": do_bench(functools.partial(read_only, rows_per, warps)) * 1000}
        for name, (kernel, extra) in variants.items():
            run = functools.partial(launch, kernel, wk, v, mq, image, part, rows_per, warps, **extra)
            times[name] = do_bench(run) * 1000
        print(f"rows {rows_per:3d} warps {warps}: " + ", ".join(f"{n} {t:6.1f}" for n, t in times.items()), flush=True)
    sums = do_bench(lambda: (wk.sum(dim=(1, 2)), v.sum(dim=(1, 2)))) * 1000
    print(f"torch sums of k and v (one read of each): {sums:.1f}")


if __name__ == "__main__":
    main()
