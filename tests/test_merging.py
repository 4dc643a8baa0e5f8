"""Merge formulas (`compose/merging.py`) on small hand-made tensors: each method against its formula,
a test per step of TIES (trim, elect, disjoint mean) and DARE (drop, rescale), Fisher merging with
equal Fisher = the weighted average, EWR with an anti-expert, add-then-negate = θ0 exactly."""

from __future__ import annotations

import pytest
import torch

from modfit.compose.merging import (
    FisherInputs,
    MergeError,
    MergeSpec,
    dare,
    dare_linear,
    dare_ties,
    disjoint_mean,
    elect_sign,
    ewr,
    fisher,
    linear,
    magnitude_prune,
    merge,
    merge_methods,
    task_arithmetic,
    ties,
    trim,
)

T = torch.tensor


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-6)


# -- linear and task arithmetic --------------------------------------------------------------------


def test_linear_is_the_weighted_average() -> None:
    a, b = {"w": T([1.0, 2.0]), "b": T([4.0])}, {"w": T([3.0, -2.0])}
    merged = linear([a, b], [1.0, 3.0])
    assert close(merged["w"], (1 * T([1.0, 2.0]) + 3 * T([3.0, -2.0])) / 4)
    assert close(merged["b"], T([1.0]))  # missing in b: a zero there, still in the average
    assert close(linear([a, b])["w"], T([2.0, 0.0]))  # default: equal weights
    with pytest.raises(MergeError, match="sum to 0"):
        linear([a, b], [1.0, -1.0])


def test_task_arithmetic_sums_and_add_then_negate_restores_theta0_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(50, 20, generator=g)
    tau = {"w": torch.randn(50, 20, generator=g) * 1e-3}
    other = {"w": torch.randn(50, 20, generator=g)}
    assert close(task_arithmetic([tau, other], [0.5, 2.0])["w"], 0.5 * tau["w"] + 2 * other["w"])
    zero = task_arithmetic([tau, tau], [1.0, -1.0])["w"]
    assert torch.equal(theta0 + zero, theta0)  # τ − τ = 0 in the task vector, so θ0 comes back bit for bit


# -- TIES, step by step ------------------------------------------------------------------------------


def test_trim_keeps_the_top_k_by_magnitude_of_the_changed_entries() -> None:
    t = T([0.1, -0.5, 0.3, -0.05, 0.0, 0.0])
    # 4 changed entries, density 0.5 -> k = 2: -0.5 and 0.3 stay
    assert torch.equal(trim(t, 0.5), T([0.0, -0.5, 0.3, 0.0, 0.0, 0.0]))
    assert torch.equal(trim(t, 1.0), t)
    assert torch.equal(trim(t, 0.01), T([0.0, -0.5, 0.0, 0.0, 0.0, 0.0]))  # at least one entry
    assert torch.equal(trim(torch.zeros(3), 0.5), torch.zeros(3))
    big = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))
    kept = trim(big, 0.2)
    assert int(torch.count_nonzero(kept)) == int(0.2 * 1200)
    assert float(kept[kept != 0].abs().min()) >= float(big[kept == 0].abs().max())


def test_elect_sign_is_the_sign_of_the_weighted_sum() -> None:
    a, b, c = T([1.0, -2.0, 0.5, 0.0]), T([-3.0, -1.0, 0.5, 0.0]), T([1.0, 4.0, -2.0, 0.0])
    assert torch.equal(elect_sign([a, b, c], [1, 1, 1]), T([-1.0, 1.0, -1.0, 0.0]))
    assert torch.equal(elect_sign([a, b], [5, 1]), T([1.0, -1.0, 1.0, 0.0]))


def test_disjoint_mean_averages_the_agreeing_entries_only() -> None:
    a, b, c = T([1.0, -2.0, 0.5, 0.0]), T([-3.0, -1.0, 0.5, 0.0]), T([2.0, 4.0, 0.0, 0.0])
    sign = T([1.0, -1.0, 1.0, 1.0])
    # entry 0: a and c agree -> (1 + 2) / 2; entry 1: a and b -> -1.5; entry 2: a, b (c is 0) -> 0.5;
    # entry 3: nobody -> 0
    assert close(disjoint_mean([a, b, c], [1, 1, 1], sign), T([1.5, -1.5, 0.5, 0.0]))
    # weighted: entry 0 = (1·1 + 3·2) / (1 + 3)
    assert close(disjoint_mean([a, b, c], [1, 1, 3], sign)[0], T(7.0 / 4))


def test_ties_is_trim_then_elect_then_disjoint_mean() -> None:
    # Three task vectors; keep 60% of each one's changed entries, elect, average.
    vectors = [
        {"w": T([0.8, -0.1, 0.5, -0.6, 0.05])},
        {"w": T([-0.7, 0.2, 0.4, -0.3, 0.0])},
        {"w": T([0.9, 0.3, -0.2, 0.0, 0.1])},
    ]
    trimmed = [trim(v["w"], 0.6) for v in vectors]
    assert torch.equal(trimmed[0], T([0.8, 0.0, 0.5, -0.6, 0.0]))  # 5 changed -> k = 3
    assert torch.equal(trimmed[1], T([-0.7, 0.0, 0.4, 0.0, 0.0]))  # 4 changed -> k = int(2.4) = 2
    assert torch.equal(trimmed[2], T([0.9, 0.3, 0.0, 0.0, 0.0]))
    sign = elect_sign(trimmed, [1, 1, 1])
    expected = disjoint_mean(trimmed, [1, 1, 1], sign)
    assert torch.equal(ties(vectors, density=0.6)["w"], expected)
    # by hand: entry 0: 0.8 + 0.9 - 0.7 > 0 -> mean(0.8, 0.9); entry 2: mean(0.5, 0.4); entry 3: -0.6 alone
    assert close(expected, T([0.85, 0.3, 0.45, -0.6, 0.0]))


def test_trim_of_four_changed_entries_at_density_0_6_keeps_two() -> None:
    # int(0.6 · 4) = 2: the two largest magnitudes
    assert torch.equal(trim(T([-0.7, 0.2, 0.4, -0.3]), 0.6), T([-0.7, 0.0, 0.4, 0.0]))


def test_ties_refuses_negative_weights() -> None:
    with pytest.raises(MergeError, match="weights must be > 0"):
        ties([{"w": T([1.0])}, {"w": T([1.0])}], [1.0, -1.0])


# -- DARE, step by step ------------------------------------------------------------------------------


def test_dare_drops_with_probability_p_and_rescales_by_one_over_one_minus_p() -> None:
    t = torch.full((200, 100), 0.3)
    out = dare(t, 0.25, torch.Generator().manual_seed(0))
    kept = out != 0
    assert torch.allclose(out[kept], torch.full_like(out[kept], 0.3 / 0.25))  # survivors rescaled
    assert abs(float(kept.float().mean()) - 0.25) < 0.01  # dropped with p = 0.75
    assert abs(float(out.mean()) - 0.3) < 0.01  # E[dare(τ)] = τ
    again = dare(t, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded
    assert torch.equal(dare(t, 1.0, torch.Generator()), t)


def test_dare_linear_and_dare_ties_are_dare_then_the_sum_or_ties_election() -> None:
    g = torch.Generator().manual_seed(3)
    vectors = [{"w": torch.randn(30, generator=g), "b": torch.randn(4, generator=g)} for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    # the draws: keys in sorted order ("b" then "w"), each vector in turn
    draw = torch.Generator().manual_seed(9)
    dropped: list[dict[str, torch.Tensor]] = [{}, {}, {}]
    for key in ("b", "w"):
        for i, v in enumerate(vectors):
            dropped[i][key] = dare(v[key], 0.4, draw)
    got = dare_linear(vectors, weights, density=0.4, generator=torch.Generator().manual_seed(9))
    for key in ("w", "b"):
        assert close(got[key], sum(w * d[key] for w, d in zip(weights, dropped, strict=True)))
    got_ties = dare_ties(vectors, weights, density=0.4, generator=torch.Generator().manual_seed(9))
    tensors = [d["w"] for d in dropped]
    assert close(got_ties["w"], disjoint_mean(tensors, weights, elect_sign(tensors, weights)))


def test_magnitude_prune_is_trim_then_the_weighted_sum() -> None:
    a, b = {"w": T([0.1, -0.5, 0.3, -0.05])}, {"w": T([0.2, 0.0, -0.9, 0.4])}
    got = magnitude_prune([a, b], [1.0, 2.0], density=0.5)["w"]
    # a: 4 changed -> k = 2; b: 3 changed -> k = int(1.5) = 1
    assert close(got, T([0.0, -0.5, 0.3, 0.0]) + 2 * T([0.0, 0.0, -0.9, 0.0]))


# -- Fisher and EWR ---------------------------------------------------------------------------------


def test_fisher_with_equal_fisher_is_the_weighted_average() -> None:
    g = torch.Generator().manual_seed(4)
    vectors = [{"w": torch.randn(5, 3, generator=g)} for _ in range(3)]
    same = torch.rand(5, 3, generator=g) + 0.1
    weights = [1.0, 2.0, 0.5]
    got = fisher(vectors, [{"w": same}] * 3, weights)
    assert close(got["w"], linear(vectors, weights)["w"])


def test_fisher_weights_each_entry_by_its_fisher() -> None:
    a, b = {"w": T([1.0, 1.0])}, {"w": T([3.0, -1.0])}
    fa, fb = {"w": T([1.0, 3.0])}, {"w": T([3.0, 1.0])}
    got = fisher([a, b], [fa, fb], [1.0, 1.0])["w"]
    assert close(got, T([(1 * 1 + 3 * 3) / 4, (3 * 1 + 1 * -1) / 4]))
    # a Fisher of 0 is floored: both models count equally there instead of 0/0
    zero = fisher([a, b], [{"w": torch.zeros(2)}, {"w": torch.zeros(2)}])["w"]
    assert close(zero, T([2.0, 0.0]))
    with pytest.raises(MergeError, match="Elastic Weight Removal"):
        fisher([a, b], [fa, fb], [1.0, -1.0])


def test_ewr_with_an_anti_expert() -> None:
    theta0, f0 = {"w": T([1.0, 2.0])}, {"w": T([1.0, 1.0])}
    tau, f = {"w": T([0.5, 1.0])}, {"w": T([1.0, 3.0])}
    # θ = (λ0 F0 θ0 + λ F τ) / (λ0 F0 + |λ| F), λ0 = 2, λ = −1
    got = ewr(theta0, f0, [tau], [f], [-1.0], base_weight=2.0)["w"]
    assert close(got, T([(2 * 1 - 0.5) / 3, (2 * 2 - 3 * 1) / 5]))
    spec = MergeSpec("fisher", (-1.0,), base_weight=2.0)
    delta = merge([tau], spec, FisherInputs([f], theta0, f0))["w"]  # through the registry: θ* − θ0
    assert close(delta, got - theta0["w"])


# -- the registry and its checks ---------------------------------------------------------------------


def test_registry_and_spec_validation() -> None:
    assert set(merge_methods()) == {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "magnitude_prune",
        "fisher",
    }
    with pytest.raises(MergeError, match="unknown merge method 'nope'; available: dare_linear"):
        MergeSpec("nope")
    with pytest.raises(MergeError, match=r"density must be in \(0, 1\]"):
        MergeSpec("ties", density=1.5)
    with pytest.raises(MergeError, match="linear takes no density"):
        MergeSpec("linear", density=0.5)
    with pytest.raises(MergeError, match="method fisher only"):
        MergeSpec("linear", base_weight=1.0)
    with pytest.raises(MergeError, match="2 weights for 1 modules"):
        merge([{"w": T([1.0])}], MergeSpec("linear", (1.0, 2.0)))
    scaled = merge([{"w": T([1.0, -0.5])}], MergeSpec("ties", scale=0.5))
    assert close(scaled["w"], T([0.5, 0.0]))  # one changed entry kept (k >= 1), times the scale
