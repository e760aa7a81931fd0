"""Next-token choice: greedy by default; temperature, nucleus, top-k and min-p sampling, a repetition penalty, an
n-gram ban and stop strings as options."""

import pytest
import torch

from infllm.engine.sampling import SamplingConfig, next_token, visible_text
from infllm.errors import UsageError


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


def test_the_repetition_penalty_lowers_tokens_already_generated():
    logits = torch.tensor([0.0, 3.0, 2.9])
    penalised = SamplingConfig(repetition_penalty=1.2)
    assert next_token(logits, penalised) == 1  # nothing generated yet: nothing to penalise
    assert next_token(logits, penalised, history=[1]) == 2  # 3.0 / 1.2 = 2.5 < 2.9
    assert next_token(logits, SamplingConfig(), history=[1]) == 1  # the default changes nothing


def test_no_repeat_ngram_bans_the_token_that_would_repeat_an_ngram():
    logits = torch.tensor([0.0, 3.0, 2.9, 0.0, 0.0, 0.0])
    history = [5, 1, 5]  # "5 1" was written; after another 5, a 1 would write it again
    assert next_token(logits, SamplingConfig(no_repeat_ngram=2), history=history) == 2
    assert next_token(logits, SamplingConfig(no_repeat_ngram=3), history=history) == 1  # "5 1 5" has no "5 5 1"


def test_top_k_and_min_p_keep_only_the_likely_tokens():
    logits = torch.tensor([1.0, 1.2, 5.0, 0.3])
    for cfg in (SamplingConfig(temperature=2.0, top_k=1), SamplingConfig(temperature=1.0, min_p=0.5)):
        picks = {next_token(logits, cfg, torch.Generator().manual_seed(s)) for s in range(20)}
        assert picks == {2}, cfg
    wide = {next_token(logits, SamplingConfig(temperature=2.0, top_k=2), torch.Generator().manual_seed(s))
            for s in range(40)}
    assert wide == {1, 2}


def test_visible_text_ends_before_a_stop_string_and_holds_back_its_start():
    assert visible_text("Answer: 42\n\nQ: next", ["\n\nQ:"]) == ("Answer: 42", True)
    assert visible_text("Answer: 42\n", ["\n\nQ:"]) == ("Answer: 42", False)  # may be a stop string's start
    assert visible_text("Answer: 42", ["\n\nQ:", "END"]) == ("Answer: 42", False)
    assert visible_text("abc", []) == ("abc", False)


@pytest.mark.parametrize("cfg, flag", [
    (SamplingConfig(repetition_penalty=0), "--repetition-penalty"),
    (SamplingConfig(repetition_penalty=float("nan")), "--repetition-penalty"),
    (SamplingConfig(no_repeat_ngram=-1), "--no-repeat-ngram"),
    (SamplingConfig(top_k=-2), "--top-k"),
    (SamplingConfig(min_p=1.5), "--min-p"),
    (SamplingConfig(stop=("",)), "--stop"),
])
def test_impossible_settings_are_refused_naming_the_flag(cfg, flag):
    with pytest.raises(UsageError, match=flag):
        cfg.validate()
