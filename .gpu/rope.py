import time, statistics, torch
from visprune.bench.model import build_model, family_for
import visprune
m = build_model("qwen2.5-vl-7b", torch.bfloat16, torch.device("cuda"))
fam = family_for(m.config)
inp = fam.make_inputs(m, 8, 1008)
h = {k: v.cpu() for k, v in inp.items() if k != "pixel_values"}
ts = []
for _ in range(10):
    t = time.perf_counter()
    m.model.get_rope_index(h["input_ids"], image_grid_thw=h["image_grid_thw"], attention_mask=h["attention_mask"], mm_token_type_ids=h["mm_token_type_ids"])
    ts.append((time.perf_counter() - t) * 1e3)
print("get_rope_index host ms, batch 8 x 1008 px:", [round(x, 1) for x in ts], "median", round(statistics.median(ts), 1), "threads", torch.get_num_threads())
