"""Next-token choice: greedy by default, temperature and nucleus sampling as options."""

import torch

from infllm.engine.sampling import SamplingConfig, next_token


def test_greedy_takes_the_argmax():
    assert next_token(torch.tensor([0.1, 3.0, 2.9]), SamplingConfig()) == 1


def test_tiny_top_p_keeps_only_the_most_likely_token():
    logits = torch.tensor([1.0, 1.2, 5.0, 0.3])
    picks = {next_token(logits, SamplingConfig(temperature=2.0, top_p=0.01), torch.Generator().manual_seed(s))
             for s in range(20)}
    assert picks == {2}


def test_sampling_is_reproducible_with_a_seed_and_varies_without_top_p():
    logits = torch.zeros(50)
    cfg = SamplingConfig(temperature=1.0)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return [next_token(logits, cfg, generator) for _ in range(10)]

    assert run(3) == run(3)
    assert len(set(run(3))) > 3
