"""GPU check: the mean-received signal's log-sum-exp from cuDNN equals FlashAttention-2's, their speed at
8 x 5184 tokens (Qwen2.5-VL-7B at 1008 px), the fused signal against float32 (with its own first pass and
with the normalisers of the block's attention call), and the one-wide-head signal (PruMerge's and the
knee's default) from half-precision products with float32 results against float32. Needs CUDA.

    python scripts/check_attention_lse.py
"""

import time

import torch

from visprune.methods import signals

g = torch.Generator(device="cuda").manual_seed(0)
for d in (80, 88):
    q, k = (torch.randn(8, 16, 5184, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    z = torch.zeros_like(k)
    flash = torch.ops.aten._scaled_dot_product_flash_attention(q, k, z, 0.0, False, False, scale=d**-0.5)[1].float()
    ours = signals._attention_lse(q, k, d**-0.5)
    diff = float((ours - flash).abs().max())
    print(d, "shape", tuple(ours.shape), "max abs diff vs flash", diff, flush=True)
    assert ours.shape == flash.shape and diff < 1e-2, "cuDNN's log-sum-exp differs from flash's"
    for name, fn in (
        (
            "flash",
            lambda q=q, k=k, z=z, d=d: torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, z, 0.0, False, False, scale=d**-0.5
            ),
        ),
        ("ours", lambda q=q, k=k, d=d: signals._attention_lse(q, k, d**-0.5)),
    ):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        print(d, name, "ms", (time.perf_counter() - t) * 100, flush=True)
q, k = (torch.randn(4, 1000, 1280, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
fused = signals.mean_received_attention(q, k, 16)
ref = signals.mean_received_attention(q.float(), k.float(), 16)
print(
    "mean-received rel err",
    float(((fused - ref).abs() / ref.abs()).max()),
    "top-125 equal",
    bool((fused.topk(125).indices.sort().values == ref.topk(125).indices.sort().values).all()),
    flush=True,
)
lse = signals.attention_with_lse(*(x.view(4, 1000, 16, 80).transpose(1, 2) for x in (q, k, k)), 80**-0.5)[1]
reused = signals.mean_received_attention(q, k, 16, lse=lse.transpose(1, 2))
print("mean-received with the block's normalisers: max abs diff", float((reused - fused).abs().max()), flush=True)
assert torch.allclose(reused, fused, rtol=1e-4, atol=1e-7), "the reused normalisers change the signal"
q, k = (torch.randn(8, 5184, 1280, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
single = signals.mean_received_attention(q, k, 16, heads="single")
ref = signals.mean_received_attention(q.float(), k.float(), 16, heads="single")
rel = float(((single - ref).abs() / ref.abs()).max())
print("single-head (8 x 5184 x 1280) rel err", rel, flush=True)
assert rel < 1e-4, "the half-precision products with float32 results differ from float32"
for name, (a, b) in (("bf16 products, float32 results", (q, k)), ("float32", (q.float(), k.float()))):
    for _ in range(2):
        signals.mean_received_attention(a, b, 16, heads="single")
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        signals.mean_received_attention(a, b, 16, heads="single")
    torch.cuda.synchronize()
    print("single-head", name, "ms", (time.perf_counter() - t) * 200, flush=True)
