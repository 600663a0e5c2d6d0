import pytest
import torch

from visprune.methods.gathered_dots import gathered_dots


def test_each_row_meets_its_own_row_of_the_table():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 5, generator=g)
    table = torch.randn(4, 3, 5, generator=g)
    index = torch.tensor([3, 0, 0, 2, 1, 3, 2])
    out = gathered_dots(x, table, index)
    assert out.shape == (7, 3) and out.dtype == torch.float32
    want = torch.tensor(
        [[float(x[t, h].double() @ table[index[t], h].double()) for h in range(3)] for t in range(7)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    half = gathered_dots(x.bfloat16(), table, index)  # float32 out from a half-precision x
    assert half.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("width", [80, 88, 5])
def test_the_gpu_kernel_equals_the_float32_expression_on_strided_rows(dtype, width):
    """The Triton kernel on rows laid out as a block's projection gives them (views of one [T, 3, H, d]
    tensor), a row count that is no multiple of its block, eager and compiled."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4133, 3, 16, width, generator=g).to(dtype).cuda()[:, 1]
    table = torch.randn(5, 16, width, generator=g).cuda()
    runs = torch.tensor([3, 0, 4, 1, 3, 2]).repeat_interleave(torch.tensor([700, 1, 1500, 900, 1000, 32]))
    scattered = torch.randint(0, 5, (4133,), generator=g)
    index = torch.cat([runs[:2000], scattered[2000:]]).cuda()  # runs of rows, and rows of any group
    want = gathered_dots(x.cpu(), table.cpu(), index.cpu())
    torch.testing.assert_close(gathered_dots(x, table, index).cpu(), want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()  # (one compilation per dtype and width would pass torch's limit)
    compiled = torch.compile(gathered_dots, fullgraph=True)
    torch.testing.assert_close(compiled(x, table, index).cpu(), want, rtol=1e-5, atol=1e-5)
