"""The engine's speculative-method records (engine/methods.py) against the installed vLLM's own config."""
import ast
import inspect
import re
from pathlib import Path
from typing import get_args

import pytest

from draftadapt.engine import methods
from draftadapt.engine.methods import METHODS, SpecMethod, spec_method
from draftadapt.engine.vllm import SpecConfig


def vllm_methods() -> set[str]:
    """Every method name vLLM's SpeculativeConfig accepts (its Literal, nested Literals flattened)."""
    from vllm.config.speculative import SpeculativeMethod

    def flat(t):
        return {a for x in get_args(t) for a in ([x] if isinstance(x, str) else flat(x))}
    return flat(SpeculativeMethod)


def test_every_method_vllm_names_is_a_record_or_refused_with_the_reason():
    """A vLLM upgrade that adds a method fails here until it gets a record or a reason."""
    names = vllm_methods()
    assert set(METHODS) <= names, f"records for methods vLLM does not know: {set(METHODS) - names}"
    unclassified = sorted(n for n in names - set(METHODS) if not methods.unsupported_reason(n))
    assert not unclassified, f"vLLM methods with neither a record nor a reason in methods.UNSUPPORTED: {unclassified}"
    assert set(methods.UNSUPPORTED) <= names, f"reasons for methods vLLM no longer has: {set(methods.UNSUPPORTED) - names}"
    assert not set(methods.UNSUPPORTED) & set(METHODS)


def test_the_mtp_alias_rule_matches_vllms_aliases():
    from vllm.config.speculative import MTPModelTypes

    aliases = {n for n in vllm_methods() if n.endswith(methods.MTP_ALIAS_SUFFIX)}
    assert aliases == set(get_args(MTPModelTypes)) - {"mtp"}, "every '*_mtp' method must be one vLLM rewrites to 'mtp'"


@pytest.mark.parametrize("name, needles", [
    ("medusa", ["choose one of ('eagle3', 'ngram', 'draft_model', 'mtp', 'suffix')", "Medusa"]),
    ("deepseek_mtp", ["choose one of", "pass 'mtp'"]),
    ("eagle", ["EAGLE-1", "use 'eagle3'"]),
    ("EAGLE3", ["spec.method='EAGLE3'; choose one of ('eagle3'"]),
])
def test_an_unknown_method_is_refused_naming_the_known_ones_and_why(name, needles):
    for make in (lambda: spec_method(name), lambda: SpecConfig(name, 3, model="d")):
        with pytest.raises(ValueError) as err:
            make()
        assert all(n in str(err.value) for n in needles), str(err.value)


def test_each_record_is_found_by_its_vllm_name():
    assert all(spec_method(name) is rec and rec.name == name for name, rec in METHODS.items())
    assert set(METHODS) == {"eagle3", "mtp", "draft_model", "ngram", "suffix"}


def test_the_records_agree_with_vllm_on_which_methods_need_a_draft_model():
    """vLLM refuses k without a model for methods that need one, takes MTP's from the target's checkpoint and
    needs nothing for the model-free ones (suffix: arctic-inference, the record's module)."""
    import importlib.util

    from vllm.config.speculative import SpeculativeConfig

    for rec in METHODS.values():
        try:
            SpeculativeConfig(method=rec.name, num_speculative_tokens=3)
            error = ""
        except (ValueError, ImportError) as exc:  # pydantic's ValidationError is a ValueError
            error = str(exc)
        assert ("without speculative model" in error) == rec.needs_model, (rec.name, error)
        assert ("target_model_config must be present" in error) == rec.weights_in_target, (rec.name, error)
        if rec.module is not None:
            assert ("Arctic Inference is required" in error) == (importlib.util.find_spec(rec.module) is None), error


@pytest.mark.parametrize("name", list(METHODS))
def test_spec_config_follows_the_record(name, monkeypatch):
    import importlib.util

    rec = spec_method(name)
    if rec.module is not None:  # installed or not, the check under test is the model one
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: object() if mod == rec.module else real(mod, *a))
    if rec.needs_model:
        with pytest.raises(ValueError, match=rf"spec.method='{name}' needs spec.model=<draft checkpoint dir>"):
            SpecConfig(name, 3)
    spec = SpecConfig(name, 3, model="d" if rec.needs_model else None)
    assert ("prompt_lookup_min" in spec.to_vllm()) == rec.prompt_lookup


def test_path_switching_matches_vllms_auto_detection():
    """vLLM 0.32 keeps the method for the names in PATH_KEEPS_METHOD and re-detects it from the draft's
    path for every other; read off its source, so an upgrade that changes the list fails here."""
    from vllm.config.speculative import SpeculativeConfig

    src = inspect.getsource(SpeculativeConfig)
    kept = re.search(r"# Automatically detect the method\s+if self\.method in \(([^)]*)\):\s+pass", src)
    assert kept, "vLLM's method auto-detection moved: re-read config/speculative.py"
    assert set(re.findall(r'"(\w+)"', kept.group(1))) == methods.PATH_KEEPS_METHOD
    for needle, method in methods.METHOD_BY_PATH.items():
        assert f'"{needle}" in self.draft_model_config.model.lower()' in src and f'self.method = "{method}"' in src
    for rec in METHODS.values():
        switched = methods.switched_by_path(rec.name, "/ckpt/x-eagle3-y")
        assert (switched is not None) == rec.path_switched, rec.name
    assert methods.switched_by_path("draft_model", "/ckpt/x-eagle3-y") == ("eagle3", "eagle3")
    assert methods.switched_by_path("draft_model", "/ckpt/draft") is None
    assert methods.switched_by_path("medusa", "/ckpt/EAGLE-llama") == ("eagle-", "eagle")  # any vLLM method


def test_the_push_facts_of_each_record_are_consistent():
    namings = {methods.OWN_HF_NAMES, methods.EAGLE3_HEAD, methods.MTP_LAYERS}
    fits = {None, methods.EAGLE3_CONFIG, methods.SAME_VOCAB}
    for rec in METHODS.values():
        assert rec.push_names is None or rec.push_names in namings, rec
        assert rec.draft_fit in fits, rec
        assert rec.pushable or not (rec.shares_embedding or rec.weights_in_target or rec.push_classes), rec
        assert not rec.needs_model or rec.draft_fit is not None, f"{rec.name}: a draft dir nothing checks"
        assert (rec.module is None) == (rec.install is None), rec
    # the three pushable drafters as the swap worker treats them (swap_worker._draftadapt_draft_names)
    assert methods.EAGLE3.shares_embedding and not methods.EAGLE3.weights_in_target
    assert methods.MTP.shares_embedding and methods.MTP.weights_in_target and methods.MTP.push_classes == ("MiMoMTP",)
    assert not methods.DRAFT_MODEL.shares_embedding, "vLLM shares no embedding with a draft model"
    assert {r.name for r in METHODS.values() if r.position_check} == {"eagle3"}
    assert {r.name for r in METHODS.values() if not r.pushable} == {"ngram", "suffix"}


def test_records_are_frozen():
    with pytest.raises(AttributeError):
        methods.EAGLE3.needs_model = False  # type: ignore[misc]
    assert isinstance(methods.EAGLE3, SpecMethod)


def test_methods_imports_only_the_standard_library():
    """vLLM's worker processes import it through swap_worker.py; config checks import it without vLLM."""
    tree = ast.parse(Path(methods.__file__).read_text())
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert mods <= {"__future__", "dataclasses"}, mods


def test_the_engine_code_asks_the_records_instead_of_comparing_method_strings():
    engine = Path(methods.__file__).parent
    literal = re.compile(r'"(eagle3|mtp|draft_model|ngram|suffix)"')
    found = []
    for f in sorted(engine.glob("*.py")):
        if f.name == "methods.py":
            continue
        tree = ast.parse(f.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
                and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        found += [f"{f.name}:{n.lineno} {n.value!r}" for n in ast.walk(tree) if isinstance(n, ast.Constant)
                  and isinstance(n.value, str) and id(n) not in docs and literal.fullmatch(f'"{n.value}"')]
    assert not found, "method names outside engine/methods.py (ask spec_method(name) instead):\n" + "\n".join(found)
