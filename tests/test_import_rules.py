"""ARCHITECTURE.md's import table, enforced: every linecam module's imports (read with ast) must
be allowed by the table row of its package, and the rules under the table hold.

The table is parsed from ARCHITECTURE.md itself, so the document and this test cannot drift:
a row's "may import" column lists linecam modules (relative to ``linecam.``) and third-party
import names in backticks; those after ``lazily:`` only inside a function; `*` is anything.
The standard library and ``from linecam import __version__`` are always allowed; imports under
``if TYPE_CHECKING:`` are annotations only and not checked.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "linecam"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}

#: Only the session factory builds ONNX Runtime sessions; these files are the exceptions.
SESSION_FACTORY = "linecam.runtime.session"
SESSION_EXCEPTIONS = {
    # The benchmark's baseline: the loop a user writes first, with ONNX Runtime's defaults on purpose.
    "linecam.bench.naive",
    # Export modules of the distillation side (issue 13), to be moved onto the factory there.
    "linecam.export.teachers", "linecam.export.onnx_export",
}
#: Only these may import TensorRT / cuda-python, and only inside a function.
GPU_MODULES = ("linecam.runtime.backends.tensorrt", "linecam.runtime.device", "linecam.export.trt",
               "linecam.export.trt_verify", "linecam.export.vlm", "linecam.bench.engines")


@dataclass
class Rule:
    modules: tuple[str, ...]
    anything: bool = False
    eager: set[str] = field(default_factory=set)
    lazy: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Import:
    name: str  # absolute dotted name
    lazy: bool  # inside a function
    line: int


def parse_table(text: str) -> list[Rule]:
    start = text.index("## Packages and what each may import")
    rules = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("## "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`linecam"):
            continue
        mods = tuple(re.findall(r"`([^`]+)`", cells[0]))
        may = cells[2]
        eager_part, _, lazy_part = may.partition("lazily:")
        eager = set(re.findall(r"`([^`]+)`", eager_part))
        lazy = set(re.findall(r"`([^`]+)`", lazy_part))
        rules.append(Rule(mods, anything="*" in eager, eager=eager - {"*"}, lazy=lazy))
    return rules


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[Import]:
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    out: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, ast.If) and "TYPE_CHECKING" in ast.unparse(ch.test):
                continue
            inner = lazy or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(ch, ast.Import):
                out.extend(Import(a.name, lazy, ch.lineno) for a in ch.names)
            elif isinstance(ch, ast.ImportFrom):
                if ch.level:
                    base = package.split(".")[: len(package.split(".")) - ch.level + 1]
                    name = ".".join(base + ([ch.module] if ch.module else []))
                else:
                    name = ch.module or ""
                if name == "linecam":  # from linecam import x: x is a module or the version
                    out.extend(Import(f"linecam.{a.name}", lazy, ch.lineno) for a in ch.names)
                else:
                    out.append(Import(name, lazy, ch.lineno))
            visit(ch, inner)

    visit(tree, False)
    return out


def rule_for(mod: str, rules: list[Rule]) -> Rule | None:
    best, best_len = None, -1
    for r in rules:
        for m in r.modules:
            if (mod == m or mod.startswith(m + ".")) and len(m) > best_len:
                best, best_len = r, len(m)
    return best


def _allowed(target: str, tokens: set[str]) -> bool:
    return any(target == t or target.startswith(t + ".") for t in tokens)


def violations(rules: list[Rule], files: list[Path]) -> list[str]:
    bad = []
    for path in files:
        mod = module_name(path)
        rule = rule_for(mod, rules)
        if rule is None:
            bad.append(f"{mod}: no row of ARCHITECTURE.md's import table covers it")
            continue
        for imp in imports_of(path):
            top = imp.name.split(".")[0]
            if top in STDLIB or imp.name in ("linecam", "linecam.__version__") or rule.anything:
                continue
            target = imp.name[len("linecam."):] if top == "linecam" else imp.name
            if _allowed(target, rule.eager) or (imp.lazy and _allowed(target, rule.lazy)):
                continue
            how = "allows only inside a function" if _allowed(target, rule.lazy) else "does not allow"
            bad.append(f"{mod}:{imp.line} imports {imp.name}, which its row ({', '.join(rule.modules)}) {how}")
    return bad


def extra_violations(files: list[Path]) -> list[str]:
    """The rules written under the table."""
    bad = []
    for path in files:
        mod = module_name(path)
        for imp in imports_of(path):
            top = imp.name.split(".")[0]
            if top in ("torch", "transformers") and not imp.lazy and not mod.startswith("linecam.export"):
                bad.append(f"{mod}:{imp.line} imports {top} at module level outside linecam.export")
            if top in ("tensorrt", "cuda") and (imp.lazy is False or not mod.startswith(GPU_MODULES)):
                bad.append(f"{mod}:{imp.line} imports {top} outside the TensorRT backend/build (or not lazily)")
            if mod.startswith("linecam.camera") and imp.name.startswith("linecam.runtime"):
                bad.append(f"{mod}:{imp.line} camera imports runtime")
            if mod.startswith("linecam.runtime") and imp.name.startswith("linecam.station"):
                bad.append(f"{mod}:{imp.line} runtime imports station (the station runs beside the daemon)")
            if mod.startswith("linecam.config") and imp.name.startswith("linecam.") and \
                    not imp.name.startswith(("linecam.config", "linecam.errors")):
                bad.append(f"{mod}:{imp.line} config imports {imp.name} (it may import only linecam.errors)")
        if mod != SESSION_FACTORY and mod not in SESSION_EXCEPTIONS:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)) and \
                        getattr(node.func, "attr", getattr(node.func, "id", None)) == "InferenceSession":
                    bad.append(f"{mod}:{node.lineno} builds an ONNX Runtime session itself: use "
                               f"linecam.runtime.session.make_session")
    return bad


def all_files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py"))


def test_every_module_keeps_to_the_import_table():
    rules = parse_table((ROOT / "ARCHITECTURE.md").read_text())
    assert len(rules) >= 15, "the import table of ARCHITECTURE.md was not found or not parsed"
    bad = violations(rules, all_files())
    assert not bad, "\n".join(bad)


def test_the_rules_under_the_table_hold():
    bad = extra_violations(all_files())
    assert not bad, "\n".join(bad)


def test_no_module_over_450_lines():
    long = [f"{module_name(p)}: {n} lines" for p in all_files()
            if (n := len(p.read_text().splitlines())) > 450
            # The distillation side's modules (issue 13) are split there.
            and module_name(p) not in ("linecam.export.quantize", "linecam.export.distil", "linecam.export.scratch")]
    assert not long, "\n".join(long)


# -- the checks can fail -------------------------------------------------------------------------
@pytest.fixture
def fake_pkg(tmp_path, monkeypatch):
    pkg = tmp_path / "linecam"
    (pkg / "camera").mkdir(parents=True)
    (pkg / "config").mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    return pkg


def test_a_broken_rule_is_reported(fake_pkg):
    table = ("## Packages and what each may import\n\n| module | role | may import |\n| --- | --- | --- |\n"
             "| `linecam.camera` | cameras | `errors`, `config`; `numpy`; lazily: `harvesters` |\n"
             "| `linecam.config` | config | `errors`; `pydantic` |\n")
    rules = parse_table(table)
    cam = fake_pkg / "camera" / "genicam.py"
    cam.write_text("import numpy\nimport harvesters\nfrom linecam.runtime import daemon\n"
                   "def f():\n    import harvesters\n")
    cfg = fake_pkg / "config" / "load.py"
    cfg.write_text("from linecam.runtime.publisher import X\nimport onnxruntime as ort\n"
                   "s = ort.InferenceSession('m.onnx')\nimport torch\n")
    bad = violations(rules, [cam, cfg])
    assert any("genicam:2 imports harvesters" in b and "only inside a function" in b for b in bad)
    assert any("genicam:3 imports linecam.runtime" in b for b in bad)
    assert any("load:1 imports linecam.runtime.publisher" in b for b in bad)
    assert not any("genicam:5" in b for b in bad)  # lazily allowed
    extra = extra_violations([cam, cfg])
    assert any("camera imports runtime" in b for b in extra)
    assert any("config imports linecam.runtime.publisher" in b for b in extra)
    assert any("builds an ONNX Runtime session" in b for b in extra)
    assert any("imports torch at module level" in b for b in extra)
