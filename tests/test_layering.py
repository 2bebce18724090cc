"""Imports run down the layers: the engine layer and the draft models import neither the toy workload nor the
checkpoint formats above them (the engine audit takes its prompts as input; toy/audit.py supplies the toy's)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "draftadapt"
NEVER = {"engine": ("draftadapt.toy", "draftadapt.preinit", "draftadapt.adapter", "draftadapt.grpo"),
         "drafts": ("draftadapt.toy", "draftadapt.preinit", "draftadapt.checkpoint", "draftadapt.engine",
                    "draftadapt.adapter")}


def imports(path: Path) -> set[str]:
    """Absolute names of the draftadapt modules `path` imports (module level or inside functions)."""
    here = ["draftadapt", *path.relative_to(PKG).with_suffix("").parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[:len(here) - node.level]
            out.add(".".join(base + ([node.module] if node.module else [])))
            out.update(".".join(base + [a.name]) for a in node.names if not node.module)
        elif isinstance(node, ast.ImportFrom):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m and m.startswith("draftadapt")}


def test_the_engine_layer_and_the_draft_models_import_nothing_above_them():
    bad = [f"{f.relative_to(PKG)} imports {m}" for folder, above in NEVER.items()
           for f in sorted((PKG / folder).rglob("*.py")) for m in sorted(imports(f)) if m.startswith(above)]
    assert not bad, "upward imports (move the code down, or pass the data in):\n" + "\n".join(bad)


def test_the_checker_sees_relative_imports():
    assert "draftadapt.atomic" in imports(PKG / "drafts" / "draft_lm.py")
    assert "draftadapt.engine.audit" in imports(PKG / "toy" / "audit.py")
