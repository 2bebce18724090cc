"""The toy task: verifiable answers, four solution styles, the reward, the tokenizer."""
import random

import pytest

from draftadapt.toy.task import (STYLES, Problem, RewardConfig, TaskConfig, parse_answer, reward,
                                 sample_chat, sample_problem, solution, style_of)
from draftadapt.toy.tokenizer import build_tokenizer, vocabulary


def test_problems_stay_in_range_and_answers_are_right():
    rng, cfg = random.Random(0), TaskConfig()
    for _ in range(500):
        p = sample_problem(rng, cfg)
        assert cfg.min_ops <= len(p.ops) <= cfg.max_ops
        v = p.operands[0]
        for op, x in zip(p.ops, p.operands[1:]):
            v = eval(f"{v} {op} {x}")
            assert 0 <= v <= cfg.max_value, p
        assert v == p.answer


@pytest.mark.parametrize("style", STYLES)
def test_every_style_parses_to_the_answer_and_is_recognised(style):
    rng = random.Random(1)
    for _ in range(50):
        p = sample_problem(rng)
        text = solution(p, style, rng)
        assert parse_answer(text) == p.answer
        assert style_of(text) == style, text


def test_reward_is_correctness_times_verbose_bonus():
    p = Problem((3, 4), ("+",), 7)
    rng = random.Random(0)
    verbose, terse = solution(p, "verbose", rng), solution(p, "terse", rng)
    assert reward(p, terse) == 1.0
    assert reward(p, verbose) == 1.0
    assert reward(p, verbose, RewardConfig(verbose_bonus=2.0)) == 3.0
    assert reward(p, "A: 8", RewardConfig(verbose_bonus=2.0)) == 0.0
    assert reward(p, "no answer at all") == 0.0


def test_verbose_reward_pays_for_the_style_right_or_wrong():
    p = Problem((3, 4), ("+",), 7)
    verbose = solution(p, "verbose", random.Random(0))
    wrong = verbose.replace("A: 7", "A: 8")
    cfg = RewardConfig(verbose_reward=0.5)
    assert reward(p, verbose, cfg) == 1.5
    assert reward(p, wrong, cfg) == 0.5
    assert reward(p, solution(p, "terse", random.Random(0)), cfg) == 1.0


def test_other_styles_zero_pays_only_correct_formal_answers():
    p = Problem((3, 4), ("+",), 7)
    rng = random.Random(0)
    cfg = RewardConfig(formal_bonus=1.0, other_styles=0.0)
    formal = solution(p, "formal", rng)
    assert reward(p, formal, cfg) == 2.0
    assert reward(p, formal.replace("A: 7", "A: 8"), cfg) == 0.0
    for style in ("cot", "terse", "verbose"):
        assert reward(p, solution(p, style, rng), cfg) == 0.0, style
    assert reward(p, solution(p, "cot", rng), RewardConfig(other_styles=0.5)) == 0.5


def test_unknown_style_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="cot"):
        solution(Problem((1, 1), ("+",), 2), "poetry", random.Random(0))


def test_tokenizer_has_one_id_per_word_and_over_1024_tokens():
    tok = build_tokenizer()
    assert len(tok) == len(vocabulary()) >= 1024
    rng = random.Random(2)
    p = sample_problem(rng)
    for text in (p.prompt + " " + solution(p, "verbose", rng), sample_chat(rng).response):
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text.split())
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_tokenizer_round_trips_through_save_pretrained(tmp_path):
    from transformers import AutoTokenizer

    from draftadapt.toy.tokenizer import save_tokenizer

    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.encode("Q: 3 + 4 =", add_special_tokens=False) == build_tokenizer().encode("Q: 3 + 4 =", add_special_tokens=False)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")


def test_chat_domain_differs_from_the_task_domain():
    rng = random.Random(3)
    ex = sample_chat(rng)
    assert ex.prompt.startswith("User:") and ex.prompt.endswith("Assistant:")
    assert "=" not in ex.response and parse_answer(ex.response) is None
