"""Sampler: exact filter semantics via ``distribution``, and draws checked statistically.

Statistical checks use 2000-4000 draws and tolerances of several standard errors, so they pass for a
correct sampler with overwhelming probability and fail for a wrong one (the seed also makes them
deterministic).
"""

from __future__ import annotations

import numpy as np
import pytest

from qwenlite.chat.sampler import Sampler, SamplerConfig, apply_repeat_penalty
from qwenlite.errors import QwenliteError

OFF = dict(top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)


def logits_of(probs: list[float]) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def draws(sampler: Sampler, logits: np.ndarray, n: int, history: list[int] = ()) -> np.ndarray:
    return np.array([sampler.sample(logits, history) for _ in range(n)])


def test_greedy_is_argmax_whatever_the_filters() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(size=1000).astype(np.float32)
        s = Sampler(SamplerConfig(temperature=0.0, seed=1))
        assert s.sample(logits) == int(np.argmax(logits))


def test_temperature_to_zero_approaches_argmax() -> None:
    logits = logits_of([0.3, 0.25, 0.2, 0.15, 0.1])
    s = Sampler(SamplerConfig(temperature=0.01, seed=3, **OFF))
    assert set(draws(s, logits, 500)) == {0}


def test_plain_sampling_matches_softmax() -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    s = Sampler(SamplerConfig(temperature=1.0, seed=7, **OFF))
    n = 4000
    freq = np.bincount(draws(s, logits_of(probs), n), minlength=4) / n
    se = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq - probs) < 5 * se), (freq, probs)


def test_temperature_reshapes_the_distribution() -> None:
    probs = np.array([0.6, 0.3, 0.1])
    s = Sampler(SamplerConfig(temperature=0.5, **OFF))
    _, p = s.distribution(logits_of(probs))
    expected = probs ** 2 / np.sum(probs ** 2)
    np.testing.assert_allclose(p, expected, rtol=1e-5)


def test_top_k_never_emits_outside_top_k() -> None:
    rng = np.random.default_rng(11)
    logits = rng.normal(size=500).astype(np.float32)
    top5 = set(np.argsort(-logits)[:5].tolist())
    s = Sampler(SamplerConfig(temperature=1.5, top_k=5, top_p=1.0, min_p=0.0, seed=5))
    got = draws(s, logits, 2000)
    assert set(got.tolist()) <= top5
    assert len(set(got.tolist())) == 5  # and all five do occur at a high temperature


def test_top_p_keeps_smallest_prefix_reaching_the_mass() -> None:
    probs = [0.4, 0.3, 0.2, 0.1]
    cand, p = Sampler(SamplerConfig(temperature=1.0, top_k=0, top_p=0.65, min_p=0.0)).distribution(logits_of(probs))
    assert cand.tolist() == [0, 1]  # 0.4 < 0.65 <= 0.7
    np.testing.assert_allclose(p, [0.4 / 0.7, 0.3 / 0.7], rtol=1e-5)
    cand, _ = Sampler(SamplerConfig(temperature=1.0, top_k=0, top_p=0.7001, min_p=0.0)).distribution(logits_of(probs))
    assert cand.tolist() == [0, 1, 2]
    cand, _ = Sampler(SamplerConfig(temperature=1.0, top_k=0, top_p=0.1, min_p=0.0)).distribution(logits_of(probs))
    assert cand.tolist() == [0]


def test_top_p_draws_stay_in_nucleus_with_renormalized_frequencies() -> None:
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    s = Sampler(SamplerConfig(temperature=1.0, top_k=0, top_p=0.65, min_p=0.0, seed=9))
    n = 3000
    got = draws(s, logits_of(probs), n)
    assert set(got.tolist()) <= {0, 1}
    f0 = np.mean(got == 0)
    p0 = 0.4 / 0.7
    assert abs(f0 - p0) < 5 * np.sqrt(p0 * (1 - p0) / n)


def test_min_p_cuts_relative_to_the_best() -> None:
    probs = [0.5, 0.2, 0.11, 0.04, 0.06, 0.09]
    cand, _ = Sampler(SamplerConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2)).distribution(logits_of(probs))
    assert sorted(cand.tolist()) == [0, 1, 2]  # p >= 0.2 * 0.5 = 0.1


def test_filters_ignore_temperature() -> None:
    """llama.cpp order: truncation sees the untempered distribution."""
    probs = [0.4, 0.3, 0.2, 0.1]
    for temp in (0.3, 1.0, 3.0):
        cand, _ = Sampler(SamplerConfig(temperature=temp, top_k=0, top_p=0.65, min_p=0.0)).distribution(
            logits_of(probs))
        assert cand.tolist() == [0, 1]


def test_repeat_penalty_llama_cpp_semantics() -> None:
    logits = np.array([2.0, -2.0, 1.0, -1.0, 0.0], dtype=np.float32)
    out = apply_repeat_penalty(logits, [0, 1, 1, 4], 2.0)
    np.testing.assert_array_equal(out, [1.0, -4.0, 1.0, -1.0, 0.0])
    np.testing.assert_array_equal(logits, [2.0, -2.0, 1.0, -1.0, 0.0])  # input untouched


def test_repeat_penalty_window_and_effect_on_greedy() -> None:
    logits = np.array([3.0, 2.0, 0.5], dtype=np.float32)
    s = Sampler(SamplerConfig(temperature=0.0, repeat_penalty=2.0, repeat_last_n=2))
    assert s.sample(logits, history=[0]) == 1  # 3/2 = 1.5 < 2
    assert s.sample(logits, history=[0, 2, 2]) == 0  # id 0 is outside the last 2
    assert Sampler(SamplerConfig(temperature=0.0, repeat_penalty=2.0, repeat_last_n=0)).sample(logits, [0]) == 0


def test_seed_reproducibility() -> None:
    logits = np.random.default_rng(2).normal(size=2000).astype(np.float32)
    cfg = SamplerConfig(temperature=1.0, top_k=50, top_p=0.9, min_p=0.0, seed=1234)
    a = draws(Sampler(cfg), logits, 300)
    b = draws(Sampler(cfg), logits, 300)
    c = draws(Sampler(SamplerConfig(temperature=1.0, top_k=50, top_p=0.9, min_p=0.0, seed=4321)), logits, 300)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("kwargs", [dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(min_p=2.0),
                                    dict(repeat_penalty=0.0), dict(temperature=float("nan"))])
def test_bad_config_is_a_user_error(kwargs: dict) -> None:
    with pytest.raises(QwenliteError):
        SamplerConfig(**kwargs)


def test_presence_and_frequency_penalties_follow_openai_formula() -> None:
    """logit -= presence * [seen] + frequency * count, over the recent window only."""
    logits = np.array([5.0, 4.0, 3.0, 0.0], np.float32)
    cfg = SamplerConfig(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25, repeat_last_n=3)
    out = Sampler(cfg)._penalized(logits, [2, 0, 0, 1])  # window [0, 0, 1]: token 2 fell out of it
    np.testing.assert_array_equal(out, np.array([5.0 - 0.5 - 0.5, 4.0 - 0.5 - 0.25, 3.0, 0.0], np.float32))
    strong = SamplerConfig(temperature=0.0, presence_penalty=0.5, frequency_penalty=1.0, repeat_last_n=3)
    assert Sampler(strong).sample(logits, [2, 0, 0, 1]) == 2  # 3.0 (outside the window) beats 2.5 and 2.5
    with pytest.raises(QwenliteError, match="presence penalty"):
        SamplerConfig(presence_penalty=2.5)


def test_logit_bias_bans_and_boosts_tokens() -> None:
    logits = np.array([5.0, 4.0, 3.0], np.float32)
    assert Sampler(SamplerConfig(temperature=0.0, logit_bias=((0, -np.inf),))).sample(logits) == 1
    assert Sampler(SamplerConfig(temperature=0.0, logit_bias=((2, 2.5),))).sample(logits) == 2
    with pytest.raises(QwenliteError, match="out of range"):
        Sampler(SamplerConfig(temperature=0.0, logit_bias=((7, 1.0),))).sample(logits)
