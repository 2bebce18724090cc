"""The offline training CLI: JSONL sequences -> an EAGLE-3 checkpoint; bad input names the fix."""
import json

import pytest

from conftest import tiny_model
from draftadapt.cli import main


def test_train_draft_cli_writes_a_loadable_checkpoint(tmp_path):
    from draftadapt.checkpoint import load_eagle3

    tiny_model("llama", layers=8, hidden=64, vocab=64).save_pretrained(tmp_path / "target")
    data = tmp_path / "seqs.jsonl"
    data.write_text("\n".join(json.dumps({"input_ids": [1, 5 + i % 7, 9, 3 + i % 5, 11, 2], "completion_start": 2})
                              for i in range(20)))
    main(["train-draft", "--target", str(tmp_path / "target"), "--data", str(data), "--out", str(tmp_path / "d"),
          "--steps", "3", "--batch-size", "4", "--draft-vocab-size", "16"])
    draft = load_eagle3(tmp_path / "d")
    assert draft.config.draft_vocab_size == 16
    assert json.loads((tmp_path / "d" / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle3"]


def test_train_draft_cli_rejects_rows_without_input_ids(tmp_path):
    tiny_model("llama", layers=8, hidden=64, vocab=64).save_pretrained(tmp_path / "target")
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: .*input_ids"):
        main(["train-draft", "--target", str(tmp_path / "target"), "--data", str(data), "--out", str(tmp_path / "d")])
