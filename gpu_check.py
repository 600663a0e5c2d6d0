"""One-off GPU checks for this session's changes (not committed)."""
import torch
from visprune.bench.model import build_model, family_for
from visprune.methods.signals import _received_batched, _received_fused
from visprune.models import adapter_for
from visprune.models.qwen_tower import aligned_gated_mlp

torch.manual_seed(0)
q, k = (torch.randn(8, 16, 5184, 80, device="cuda", dtype=torch.bfloat16) * 2 for _ in range(2))
ref = _received_batched(q.float(), k.float(), 0, None)
got = _received_fused(q, k, 0)
print("fused received max rel err", ((got - ref).abs() / ref.abs()).max().item())
rank_ref, rank_got = ref.argsort(-1, descending=True)[:, :648], got.argsort(-1, descending=True)[:, :648]
same = [len(set(a.tolist()) & set(b.tolist())) / 648 for a, b in zip(rank_ref, rank_got)]
print("top-12.5% overlap fused vs float32", min(same))
model = build_model("qwen2.5-vl-7b", torch.bfloat16, torch.device("cuda"))
blk = model.model.visual.blocks[0]
x = torch.randn(41472, 1280, device="cuda", dtype=torch.bfloat16)
with torch.inference_mode():
    a, b = aligned_gated_mlp(blk.mlp, x), blk.mlp(x)
print("aligned mlp max rel diff", ((a.float() - b.float()).abs().max() / b.float().abs().max()).item())
