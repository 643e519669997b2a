from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from divmerge_core.learned.divergence import divergence, entropy, js, kl


def logp(shape=(5, 7), seed=0, scale=3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.log_softmax(torch.randn(shape, generator=g, dtype=torch.float64) * scale, dim=-1)


def test_js_identical_is_zero():
    p = logp()
    assert torch.allclose(js(p, p), torch.zeros(5, dtype=p.dtype), atol=1e-12)


def test_js_symmetric_and_bounded():
    p, q = logp(seed=1), logp(seed=2)
    assert torch.allclose(js(p, q), js(q, p))
    assert (js(p, q) > 0).all() and (js(p, q) <= math.log(2) + 1e-12).all()
    # disjoint supports reach the bound log 2 exactly
    a = torch.log(torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64))
    b = torch.log(torch.tensor([[0.0, 1.0], [0.5, 0.5]], dtype=torch.float64))
    assert torch.allclose(js(a, b), torch.tensor([math.log(2), 0.0], dtype=torch.float64))


def test_js_matches_definition():
    p, q = logp(seed=3), logp(seed=4)
    P, Q = p.exp(), q.exp()
    M = (P + Q) / 2
    ref = 0.5 * (P * (P / M).log()).sum(-1) + 0.5 * (Q * (Q / M).log()).sum(-1)
    assert torch.allclose(js(p, q), ref)


def test_kl_matches_torch():
    p, q = logp(seed=5), logp(seed=6)
    ref = F.kl_div(q, p, reduction="none", log_target=True).sum(-1)
    assert torch.allclose(kl(p, q), ref)
    assert torch.allclose(divergence("kl", p, q), ref)
    assert torch.allclose(kl(p, p), torch.zeros(5, dtype=p.dtype), atol=1e-12)


def test_zero_probabilities_give_finite_values_and_gradients():
    teacher = torch.log(torch.tensor([[0.7, 0.3, 0.0, 0.0]]))
    logits = torch.randn(1, 4, requires_grad=True)
    for fn in (js, kl):
        value = fn(teacher, F.log_softmax(logits, dim=-1)).sum()
        (grad,) = torch.autograd.grad(value, logits)
        assert math.isfinite(value.item()) and torch.isfinite(grad).all()
    # both zero at the same place: JS still finite with finite gradients
    s = torch.log(torch.tensor([[0.5, 0.5, 0.0, 0.0]])).requires_grad_(True)
    value = js(teacher, s).sum()
    (grad,) = torch.autograd.grad(value, s)
    assert math.isfinite(value.item()) and torch.isfinite(grad).all()
    # KL against a student that gives 0 to a teacher-supported token is infinite
    assert kl(teacher, torch.log(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))).item() == math.inf


def test_entropy():
    p = logp(seed=7)
    assert torch.allclose(entropy(p), -(p.exp() * p).sum(-1))
    uniform = torch.full((1, 8), -math.log(8), dtype=torch.float64)
    assert torch.allclose(entropy(uniform), torch.tensor([math.log(8)], dtype=torch.float64))
    one_hot = torch.log(torch.tensor([[1.0, 0.0, 0.0]]))
    assert entropy(one_hot).item() == 0.0
