"""Shared test settings: deterministic torch, small thread count for 2-core CI."""

import torch
from hypothesis import settings

torch.manual_seed(0)
torch.set_num_threads(2)
settings.register_profile("ci", max_examples=25, deadline=None)
settings.load_profile("ci")
