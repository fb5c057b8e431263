"""Sampling against transformers' logits processors, and the draws against their distribution."""

import numpy as np
import pytest

from koifish_core.errors import KoifishError
from koifish_core.infer.sampling import Sampler, SamplingParams, filter_logits, sample_token

torch = pytest.importorskip("torch")


def _hf_filtered(logits, p: SamplingParams, previous):
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ids = torch.tensor([previous], dtype=torch.long)
    scores = torch.tensor(logits[None], dtype=torch.float64)
    steps = []
    if p.repetition_penalty != 1.0:
        steps.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    steps.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        steps.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        steps.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        steps.append(MinPLogitsWarper(p.min_p))
    for step in steps:
        scores = step(ids, scores)
    return scores[0].numpy()


PARAMS = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=0.6, top_p=0.95, top_k=20),  # Qwen3's thinking defaults
    SamplingParams(temperature=1.3, top_p=0.5),
    SamplingParams(temperature=0.8, min_p=0.1),
    SamplingParams(temperature=0.9, top_k=30, top_p=0.8, min_p=0.05, repetition_penalty=1.3),
    SamplingParams(temperature=1.0, repetition_penalty=0.7),
]


@pytest.mark.parametrize("params", PARAMS, ids=str)
def test_filtered_logits_equal_transformers(params):
    rng = np.random.default_rng(0)
    for trial in range(5):
        logits = rng.standard_normal(100) * 3
        previous = list(rng.integers(0, 100, 12))
        ours = filter_logits(logits, params, previous)
        ref = _hf_filtered(logits, params, previous)
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
        kept = ~np.isinf(ref)
        assert kept.sum() >= 1
        np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-12)


def test_draws_follow_the_filtered_distribution():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.06, 0.04]))
    params = SamplingParams(temperature=1.0, top_p=0.85, seed=1)  # keeps 0.5, 0.25, 0.15 (0.9 >= 0.85)
    sampler = Sampler(params)
    counts = np.bincount([sampler(logits) for _ in range(20000)], minlength=5)
    expected = np.array([0.5, 0.25, 0.15, 0, 0]) / 0.9
    assert counts[3] == counts[4] == 0
    np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.015)


def test_seed_reproduces_and_greedy_takes_the_penalized_argmax():
    logits = np.random.default_rng(2).standard_normal(50)
    a = Sampler(SamplingParams(temperature=1.0, seed=7))
    b = Sampler(SamplingParams(temperature=1.0, seed=7))
    assert [a(logits) for _ in range(30)] == [b(logits) for _ in range(30)]
    positive = logits - logits.min() + 1.0  # a penalty divides positive logits
    best, second = np.argsort(positive)[-1], np.argsort(positive)[-2]
    greedy = SamplingParams(temperature=0.0, repetition_penalty=10.0)
    assert sample_token(positive, greedy, None, previous_ids=[]) == best
    assert sample_token(positive, greedy, None, previous_ids=[best]) == second


@pytest.mark.parametrize("bad,message", [
    (dict(temperature=-1), "temperature: expected >= 0"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(min_p=2.0), "min_p"), (dict(repetition_penalty=0), "repetition_penalty")])
def test_bad_params_are_named(bad, message):
    with pytest.raises(KoifishError, match=message):
        Sampler(SamplingParams(**bad))
