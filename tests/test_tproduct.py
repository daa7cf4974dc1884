import pytest
import torch

from hosa_lib.tproduct import t_identity, t_product, t_product_reference, t_transpose


@pytest.mark.parametrize("d", [1, 2, 7, 8, 15, 16])
@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 6, 2), (5, 1, 3)])
def test_fft_equals_block_circulant(d, shape):
    g = torch.Generator().manual_seed(d * 100 + sum(shape))
    n1, n2, n3 = shape
    a = torch.randn(n1, n2, d, generator=g, dtype=torch.float64)
    b = torch.randn(n2, n3, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(t_product(a, b), t_product_reference(a, b))


def test_matches_explicit_circular_convolution():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    b = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    c = torch.zeros(2, 2, 5, dtype=torch.float64)
    for i in range(2):
        for k in range(2):
            for j in range(3):
                for n in range(5):
                    for q in range(5):
                        c[i, k, n] += a[i, j, q] * b[j, k, (n - q) % 5]
    torch.testing.assert_close(t_product(a, b), c)


def test_batched_leading_dims():
    a = torch.randn(4, 2, 3, 6, dtype=torch.float64)
    b = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    out = t_product(a, b)
    for i in range(4):
        torch.testing.assert_close(out[i], t_product_reference(a[i], b[i]))


@pytest.mark.parametrize("d", [5, 8])
def test_identity_and_transpose(d):
    a = torch.randn(3, 4, d, dtype=torch.float64)
    b = torch.randn(4, 2, d, dtype=torch.float64)
    torch.testing.assert_close(t_product(a, t_identity(4, d, dtype=torch.float64)), a)
    torch.testing.assert_close(t_product(t_identity(3, d, dtype=torch.float64), a), a)
    torch.testing.assert_close(t_transpose(t_product(a, b)), t_product(t_transpose(b), t_transpose(a)))
    torch.testing.assert_close(t_transpose(t_transpose(a)), a)


def test_gradcheck():
    a = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(t_product, (a, b))


def test_shape_mismatch_message():
    with pytest.raises(ValueError, match="t-product shape mismatch"):
        t_product(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
