import math

import pytest
import torch

from lightfmp.gates import HardConcreteGate


def test_keep_probability_matches_monte_carlo_and_closed_form():
    torch.manual_seed(0)
    gate = HardConcreteGate(["a", "b", "c", "d"])
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-3.0, -1.0, 0.0, 2.0]))
    z = gate.sample(200_000)
    assert z.min() >= 0 and z.max() <= 1
    empirical = (z > 0).double().mean(0)
    torch.testing.assert_close(empirical, gate.keep_probability().double().detach(), atol=4e-3, rtol=0)
    # the Louizos et al. constant: P(z != 0) = sigmoid(log_alpha + 1.5986) for the standard stretch
    assert float(gate.keep_probability()[2]) == pytest.approx(1 / (1 + math.exp(-1.5986)), abs=1e-4)
    assert float(gate.keep_probability()[2]) == pytest.approx(0.832, abs=1e-3)
    # exact zeros and ones both have mass
    assert ((z == 0).double().mean(0)[0] > 0.5) and ((z == 1).double().mean(0)[3] > 0.3)


def test_deterministic_gate_and_eval_mode():
    gate = HardConcreteGate(["a", "b"])
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([0.0, -5.0]))
    torch.testing.assert_close(gate.test_gate(), torch.tensor([0.5, 0.0]))
    gate.eval()
    out = gate(3)
    assert out.shape == (3, 2) and torch.equal(out, gate(3))
    gate.train()
    assert not torch.equal(gate(1000), gate(1000))


def test_initial_keep_probability_and_log_alpha_clamp():
    gate = HardConcreteGate(list("abc"), init_keep_probability=0.9)
    torch.testing.assert_close(gate.keep_probability(), torch.full((3,), 0.9))
    with torch.no_grad():
        gate.log_alpha.fill_(1e6)
    assert torch.isfinite(gate.sample(10)).all() and torch.isfinite(gate.keep_probability()).all()


def test_penalty_gradient_closes_gates():
    gate = HardConcreteGate(list("abc"), l0_weight=1.0)
    gate.penalty().backward()
    assert (gate.log_alpha.grad > 0).all()  # descent lowers log_alpha


def test_lagrangian_target_dual_ascent_and_warmup():
    gate = HardConcreteGate(list("abcd"), init_keep_probability=0.9, target_fields=0.5)
    assert gate.target == 2.0 and gate.initial_l0 == pytest.approx(3.6)
    # at progress 0 the target is the initial expected count: no pressure
    gate.dual_step(lr=1.0, progress=0.0)
    assert torch.allclose(gate.multipliers, torch.zeros(2), atol=1e-6)
    opt = torch.optim.SGD(gate.gate_parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        gate.penalty(progress=1.0).backward()
        opt.step()
        gate.dual_step(lr=1.0)
    # E[L0] = 3.6 > 2: dual ascent raised lambda_1, which pushed the gates down towards the target
    assert float(gate.multipliers[0]) > 0 and float(gate.multipliers[1]) > 0
    assert float(gate.expected_l0()) < 3.0
    weighted = HardConcreteGate(list("ab"), l0_weight=0.5)
    assert float(weighted.penalty(progress=0.0)) == 0.0
    assert float(weighted.penalty(progress=0.5)) == pytest.approx(0.25 * float(weighted.expected_l0()))
    with pytest.raises(ValueError, match="progress must be in"):
        weighted.penalty(progress=2.0)


def test_kept_mask_report_and_errors():
    gate = HardConcreteGate(["a", "b", "c"])
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([1.0, -4.0, 3.0]))
    assert gate.kept_mask().tolist() == [True, False, True]
    assert gate.kept_mask(top_k=1).tolist() == [False, False, True]
    report = gate.report()
    assert list(report.field) == ["c", "a", "b"] and list(report.kept) == [True, True, False]
    assert {"field", "keep_probability", "kept"} <= set(report.columns)
    with pytest.raises(ValueError, match="top_k must be in \\[1, 3\\], got 4"):
        gate.kept_mask(top_k=4)
    with pytest.raises(ValueError, match="target_fields"):
        HardConcreteGate(["a"], target_fields=3)
    with pytest.raises(ValueError, match="init_keep_probability"):
        HardConcreteGate(["a"], init_keep_probability=1.0)
    with pytest.raises(ValueError, match="at least one"):
        HardConcreteGate([])
