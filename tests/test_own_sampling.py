"""Ferry's own sampler (worker/engines/image_batching.py) with the extreme values the API
accepts as vLLM does: a draw never fails, so no request can stop the batch."""

from __future__ import annotations

import pytest
import torch

from worker.engines.base import SamplingOptions
from worker.engines.image_batching import _processed, _sampled, _Sequence


def _sequence(**options: float) -> _Sequence:
    return _Sequence(
        request_id="r",
        model_inputs={},
        max_new_tokens=4,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        generator=torch.Generator().manual_seed(0),
        eos_ids=set(),
        options=SamplingOptions(**options),
        prompt_ids=[1, 2],
        tokens=[2],
    )


@pytest.mark.parametrize("penalty", [5e-324, 1e-30, 1e30, 1.7e308])
def test_an_extreme_repetition_penalty_still_draws_a_token(penalty: float) -> None:
    raw = torch.tensor([0.5, 3.0, -2.0, 1.0])
    seq = _sequence(repetition_penalty=penalty)
    token = _sampled(_processed(raw, seq), seq)
    assert 0 <= token < 4
    if penalty < 1:  # token 1 (seen, positive) was pushed to +inf: it is the only choice
        assert token == 1


def test_a_tiny_temperature_on_large_logits_draws_the_likeliest() -> None:
    seq = _sequence()
    seq.temperature = 1e-9
    assert _sampled(torch.tensor([1e38, -1e38, 3e38]), seq) == 2


def test_nothing_finite_left_still_answers() -> None:
    seq = _sequence()
    assert _sampled(torch.tensor([float("nan"), float("nan")]), seq) in (0, 1)
