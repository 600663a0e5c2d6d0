import time, torch, visprune
from tests.models import tiny
def test_x():
    m = tiny.tiny_llava()
    inp = tiny.make_inputs(m,[2,6,9],seed=3)
    for i in range(3):
        t=time.time(); tiny.greedy(m, inp, 5); print("gen", time.time()-t, torch.get_num_threads())
    for i in range(3):
        t=time.time(); 
        with torch.no_grad(): m(**inp)
        print("fwd", time.time()-t)
    visprune.apply(m, "none")
    for i in range(3):
        t=time.time(); tiny.greedy(m, inp, 5); print("pgen", time.time()-t, torch.get_num_threads())
    for i in range(3):
        t=time.time(); 
        with torch.no_grad(): m(**inp)
        print("pfwd", time.time()-t)
