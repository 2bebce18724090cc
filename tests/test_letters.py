"""draftadapt.toy.letters: the second task with its own tokenizer (the replay lab's new-token drift)."""
import random

import pytest

from draftadapt.toy.letters import (LOWER, UPPER, LettersConfig, Problem, config_hash, correct, encode_prompt, is_upper,
                                    letters_artefacts, reward, sample_problem, save_tokenizer, vocabulary)


def test_tokenizer_round_trips_every_letter_case_and_word(tmp_path):
    tok = save_tokenizer(tmp_path / "tok")
    assert len(tok) == len(vocabulary()) == 4 + 3 + 52
    p = sample_problem(random.Random(0))
    ids = encode_prompt(tok, p.prompt)
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids[1:]) == p.prompt
    text = "A b Z reverse : ."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert len(set(tok.convert_tokens_to_ids(LOWER + UPPER))) == 52  # every case its own token


def test_problem_answer_is_the_reversed_letters():
    p = sample_problem(random.Random(3), LettersConfig(min_letters=4, max_letters=4))
    letters = p.prompt.split()[2:-1]
    assert len(letters) == 4 and p.answer.split() == letters[::-1]


def test_reward_pays_upper_case_only_when_asked_and_partial_credit():
    p = Problem("reverse : a b c .", "c b a")
    assert reward(p, "c b a") == 1.0 and reward(p, "C B A") == 1.0
    assert reward(p, "c b a", upper_only=True) == 0.0
    assert reward(p, "C B A", upper_only=True) == 1.0
    assert reward(p, "C X A", upper_only=True) == pytest.approx(2 / 3)
    assert reward(p, "C B A D", upper_only=True) == pytest.approx(3 / 4)  # an extra letter costs
    assert reward(p, "C b A", upper_only=True) == 0.0  # mixed case is not the upper-case style
    assert is_upper("C B A") and not is_upper("") and not is_upper("C b A")
    assert correct(p, "C B A") and not correct(p, "C B")


@pytest.mark.slow  # a pinned child process trains a policy and a draft: ~40 s of CPU
def test_first_draft_vocab_excludes_upper_case_letters(tmp_path):
    """A small build (its own cache dir): the draft's vocab is the most frequent completion tokens of the policy's
    own samples - a-z and <eos> - and holds no upper-case letter, though the policy writes some."""
    from transformers import PreTrainedTokenizerFast

    from draftadapt.checkpoint import load_eagle3

    cfg = LettersConfig(sft_steps=120, draft_steps=20, draft_prompts=48)
    art = letters_artefacts(cfg, root=tmp_path)
    assert art.root.name == f"letters-{config_hash(cfg)}"
    tok = PreTrainedTokenizerFast.from_pretrained(str(art.tokenizer))
    kept = set(tok.convert_ids_to_tokens(load_eagle3(art.draft).target_ids().tolist()))
    assert len(kept) == cfg.draft_vocab_size
    assert kept == set(LOWER) | {"<eos>"}, f"draft vocab {sorted(kept)}"
    assert letters_artefacts(cfg, root=tmp_path) == art  # cached: the second call builds nothing
