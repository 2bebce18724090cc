"""Imports run down the layers: the engine layer and the draft models import neither the toy workload nor the
checkpoint formats above them (the engine audit takes its prompts as input; toy/audit.py supplies the toy's), and
the library imports the toy workload nowhere: the toy plugs itself in (toy/preinit_sources.py registers its pre-init
data and target) and only the command-line app (cli.py, the `draftadapt demo` command) starts it."""
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


def test_the_library_imports_the_toy_workload_nowhere():
    bad = [f"{f.relative_to(PKG)} imports {m}" for f in sorted(PKG.rglob("*.py"))
           if f.relative_to(PKG).parts[0] != "toy" and f.name != "cli.py"
           for m in sorted(imports(f)) if m.startswith("draftadapt.toy")]
    assert not bad, "the library imports the toy (register it from the toy, or take it as input):\n" + "\n".join(bad)


def test_the_checker_sees_relative_imports():
    assert "draftadapt.atomic" in imports(PKG / "drafts" / "draft_lm.py")
    assert "draftadapt.engine.audit" in imports(PKG / "toy" / "audit.py")
    assert "draftadapt.toy.policy" in imports(PKG / "cli.py")  # the exempt app does import it: the test can fail
