"""Pre-init data: local files in the real DAPO / UltraChat schemas load, bad rows are counted and
skipped (or refused by a flag), rendering uses the chat template or the plain one. No network."""
import json

import pytest

from draftadapt.preinit.data import DataConfig, RenderConfig, load_rows, parse_rows, render
from draftadapt.toy.preinit_sources import toy_rows  # also registers data.source=toy

DAPO_GOOD = [
    {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "Q: 3 + 4 ="}], "ability": "MATH",
     "reward_model": {"ground_truth": "7", "style": "rule-lighteval/MATH_v2"}, "extra_info": {"index": "a1"}},
    {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "Q: 2 * 5 ="}], "ability": "MATH",
     "reward_model": {"ground_truth": "10", "style": "rule-lighteval/MATH_v2"}, "extra_info": {"index": "a2"}},
]
DAPO_BAD = [
    {"data_source": "math_dapo", "reward_model": {"ground_truth": "1", "style": "rule"}},  # no prompt column
    {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "Q: 1 + 1 ="}]},  # no ground truth
    {"data_source": "math_dapo", "prompt": [], "reward_model": {"ground_truth": "1", "style": "rule"}},  # empty
]
ULTRA = [
    {"prompt": "hi", "prompt_id": "p0", "messages": [{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "hello there"},
                                                     {"role": "user", "content": "more"}]},
    {"prompt": "x", "prompt_id": "p1", "messages": []},  # empty messages
    {"prompt": "x", "prompt_id": "p2", "messages": [{"role": "user", "content": "  "}]},  # empty content
    {"prompt": "x", "prompt_id": "p3", "messages": [{"role": "assistant", "content": "first"}]},  # no user turn
    {"prompt": "x", "prompt_id": "p4"},  # no messages column
]


@pytest.fixture(scope="module")
def tok():
    from draftadapt.toy.tokenizer import build_tokenizer

    return build_tokenizer()


def _jsonl(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


def test_dapo_jsonl_and_parquet_load_alike_and_bad_rows_are_counted_by_reason(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = DAPO_GOOD + DAPO_BAD
    _jsonl(tmp_path / "dapo.jsonl", rows, extra_lines=["{not json\n"])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dapo.parquet")
    got = {}
    for suffix in ("jsonl", "parquet"):
        cfg = DataConfig(source="local", path=str(tmp_path / f"dapo.{suffix}"), schema="dapo")
        got[suffix] = parse_rows(load_rows(cfg), cfg)
    convs, bad = got["jsonl"]
    assert [(c.prompt, c.ground_truth, c.response) for c in convs] == \
        [([{"role": "user", "content": "Q: 3 + 4 ="}], "7", None), ([{"role": "user", "content": "Q: 2 * 5 ="}], "10", None)]
    assert got["parquet"][0] == convs, "parquet rows must parse exactly like the same jsonl rows"
    assert dict(bad.counts) == {"missing_column:prompt": 1, "missing_column:reward_model.ground_truth": 1,
                                "empty_messages": 1, "unreadable_row": 1}
    assert bad.examples["empty_messages"] == [4]
    assert dict(got["parquet"][1].counts) == {k: v for k, v in bad.counts.items() if k != "unreadable_row"}


def test_ultrachat_first_turn_is_the_prompt_and_bad_rows_are_skipped(tmp_path):
    cfg = DataConfig(source="local", path=str(_jsonl(tmp_path / "u.jsonl", ULTRA)), schema="ultrachat")
    convs, bad = parse_rows(load_rows(cfg), cfg)
    assert len(convs) == 1
    assert convs[0].prompt == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert convs[0].response == "hello there"
    assert dict(bad.counts) == {"empty_messages": 1, "empty_message_content": 1, "no_user_turn": 1,
                                "missing_column:messages": 1}


def test_on_bad_rows_error_refuses_the_file_listing_the_counts(tmp_path):
    cfg = DataConfig(source="local", path=str(_jsonl(tmp_path / "u.jsonl", ULTRA)), schema="ultrachat",
                     on_bad_rows="error")
    with pytest.raises(ValueError, match=r"4 bad rows .*empty_messages: 1 \(rows \[1\]\).*on_bad_rows=skip"):
        parse_rows(load_rows(cfg), cfg)


def test_duplicate_prompts_are_dropped_and_counted(tmp_path):
    cfg = DataConfig(source="local", path=str(_jsonl(tmp_path / "d.jsonl", DAPO_GOOD * 3)), schema="dapo")
    convs, bad = parse_rows(load_rows(cfg), cfg)
    assert len(convs) == 2 and bad.duplicates == 4 and bad.total == 0


def test_plain_render_counts_over_long_and_response_less_rows(tmp_path, tok):
    rows = [{"prompt": "p", "messages": [{"role": "user", "content": "User: bada ? Assistant:"},
                                         {"role": "assistant", "content": "kobi la ."}]},
            {"prompt": "p", "messages": [{"role": "user", "content": "User: " + "bada " * 40 + "? Assistant:"},
                                         {"role": "assistant", "content": "kobi ."}]},
            {"prompt": "p", "messages": [{"role": "user", "content": "User: kobi ? Assistant:"}]}]
    cfg = DataConfig(source="local", path=str(_jsonl(tmp_path / "u.jsonl", rows)), schema="ultrachat")
    convs, _ = parse_rows(load_rows(cfg), cfg)
    rc = RenderConfig(template="plain", plain_turn="{content}", plain_generation_prompt="", max_prompt_tokens=16)
    samples, bad = render(convs, tok, rc, need_response=True)
    assert dict(bad.counts) == {"prompt_too_long": 1, "no_response": 1}
    (s,) = samples
    assert s.prompt_ids == [tok.bos_token_id] + tok.encode("User: bada ? Assistant:", add_special_tokens=False)
    assert s.response_ids == tok.encode("kobi la .", add_special_tokens=False) + [tok.eos_token_id]
    with pytest.raises(ValueError, match="prompt_too_long: 1"):
        render(convs, tok, rc, on_bad_rows="error", need_response=True)


def test_chat_template_renders_prompt_and_response_as_the_template_does(tok):
    from draftadapt.preinit.data import Conversation

    tok = tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token="<bos>", eos_token="<eos>",
                        unk_token="<unk>", pad_token="<pad>")
    tok.chat_template = ("<bos> {% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }} ? "
                         "{% else %}Assistant: {{ m['content'] }} <eos> {% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}Assistant: {% endif %}")
    conv = Conversation(0, [{"role": "user", "content": "bada kobi"}], "la .")
    (s,), bad = render([conv], tok, RenderConfig(), need_response=True)
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    assert s.prompt_ids == enc("<bos> User: bada kobi ? Assistant:")
    assert s.response_ids == enc("la . <eos>"), "the response ends with the template's end-of-turn token"
    (p,), _ = render([conv], tok, RenderConfig(template="plain", plain_turn="User: {content} ?",
                                               plain_generation_prompt=" Assistant:"), need_response=True)
    assert p.prompt_ids == s.prompt_ids, "forcing the plain template here gives the same ids by construction"


def test_toy_rows_are_real_schemas_and_the_toy_draft_prompts(tok):
    from draftadapt.toy.draft import domain_prompts

    rc = RenderConfig(template="plain", plain_turn="{content}", plain_generation_prompt="")
    for domain, schema in (("task", "dapo"), ("chat", "ultrachat")):
        cfg = DataConfig(source="toy", path=domain, schema=schema, max_rows=12, seed=100)
        convs, bad = parse_rows(load_rows(cfg), cfg)
        samples, _ = render(convs, tok, rc, need_response=True)
        assert bad.total == 0 and len(samples) == 12
        assert [s.prompt_ids for s in samples] == domain_prompts(tok, domain, 12, 100)
    assert toy_rows("task", 1, 0)[0]["reward_model"]["ground_truth"].isdigit()
    with pytest.raises(ValueError, match="path 'task' with schema 'dapo'"):
        DataConfig(source="toy", path="task", schema="ultrachat")


def test_an_unregistered_source_is_refused_naming_how_to_register_it():
    with pytest.raises(ValueError, match="register_rows.*draftadapt.toy.preinit_sources"):
        DataConfig(source="toy-math", path="task", schema="dapo")


def test_hub_rows_come_from_datasets_load_dataset_with_the_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, split):
        calls.append((path, split))
        return [ULTRA[0]] * 3

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(source="hub", path="HuggingFaceH4/ultrachat_200k", split="train_sft", schema="ultrachat",
                     max_rows=3, dedupe=False)
    convs, _ = parse_rows(load_rows(cfg), cfg)
    assert calls == [("HuggingFaceH4/ultrachat_200k", "train_sft[:3]")] and len(convs) == 3


def test_every_preset_loads_and_the_config_checks_cross_section_limits():
    from pathlib import Path

    from draftadapt.preinit.pipeline import load_config

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    for name in ("dapo", "ultrachat", "custom", "toy_task", "toy_chat"):
        cfg = load_config(recipes / f"preinit_{name}.yaml", ["run.target=/models/x"])
        assert cfg.run.target == "/models/x"
    with pytest.raises(ValueError, match="run.target is not set"):
        load_config(recipes / "preinit_dapo.yaml")
    with pytest.raises(ValueError, match="exceeds run.max_model_len"):
        load_config(recipes / "preinit_toy_task.yaml", ["regen.max_tokens=4096"])
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(recipes / "preinit_toy_task.yaml", ["regen.max_tokenz=4"])
