"""Real-view FFTs against torch.fft (values and gradients), numerical gradient checks, and the real complex product."""

from __future__ import annotations

import pytest
import torch

from medsegdiff_monai.networks.real_fft import complex_multiply, irfft2_real, rfft2_real

SIZES = [(4, 6), (5, 7), (3, 8), (6, 1), (1, 5)]


@pytest.mark.parametrize("height, width", SIZES)
def test_rfft2_real_matches_torch_fft_in_values_and_gradients(height, width):
    generator = torch.Generator().manual_seed(height * width)
    x = torch.randn(2, 3, height, width, generator=generator, dtype=torch.float64)
    leaf, reference_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    spectrum = rfft2_real(leaf)
    reference = torch.view_as_real(torch.fft.rfft2(reference_leaf))
    assert spectrum.shape == (2, 3, height, width // 2 + 1, 2)
    torch.testing.assert_close(spectrum, reference, rtol=0, atol=0)
    grad = torch.randn(spectrum.shape, generator=generator, dtype=torch.float64)
    spectrum.backward(grad)
    reference.backward(grad)
    torch.testing.assert_close(leaf.grad, reference_leaf.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("height, width", SIZES)
def test_irfft2_real_matches_torch_fft_in_values_and_gradients(height, width):
    generator = torch.Generator().manual_seed(height + width)
    spectrum = torch.randn(2, height, width // 2 + 1, 2, generator=generator, dtype=torch.float64)
    leaf, reference_leaf = spectrum.clone().requires_grad_(), spectrum.clone().requires_grad_()
    x = irfft2_real(leaf, (height, width))
    reference = torch.fft.irfft2(torch.view_as_complex(reference_leaf), s=(height, width))
    assert x.shape == (2, height, width)
    torch.testing.assert_close(x, reference, rtol=0, atol=0)
    grad = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    x.backward(grad)
    reference.backward(grad)
    torch.testing.assert_close(leaf.grad, reference_leaf.grad, rtol=1e-12, atol=1e-12)


def test_gradients_pass_numerical_check():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    spectrum = torch.randn(2, 5, 4, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rfft2_real, (x,))
    assert torch.autograd.gradcheck(lambda s: irfft2_real(s, (5, 6)), (spectrum,))
    assert torch.autograd.gradcheck(lambda s: irfft2_real(s, (5, 7)), (spectrum,))


def test_round_trip_restores_the_signal():
    x = torch.randn(3, 7, 9, dtype=torch.float64)
    torch.testing.assert_close(irfft2_real(rfft2_real(x), (7, 9)), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conjugate_b", [False, True])
def test_complex_multiply_matches_complex_arithmetic_with_broadcasting(conjugate_b):
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(2, 1, 4, 2, generator=generator, dtype=torch.float64)
    b = torch.randn(2, 3, 4, 2, generator=generator, dtype=torch.float64)
    a_complex, b_complex = torch.view_as_complex(a), torch.view_as_complex(b)
    expected = a_complex * (b_complex.conj() if conjugate_b else b_complex)
    torch.testing.assert_close(complex_multiply(a, b, conjugate_b), torch.view_as_real(expected))
