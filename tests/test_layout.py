"""The engine's layout (README "Layout"): layers whose imports point one way, stages that never import
one another, configs that import no torch, one registry per choice, and files a reader can hold.

    errors <- core <- model, datasets <- algos <- stages <- pipeline <- cli

Read statically (ast) from engine/, so a new import in the wrong direction fails here before it can
form a cycle."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE = os.path.join(ROOT, "engine")
# the layer of each top-level part of the package; a module may import its own part and lower layers
LAYERS = {"errors": 0, "core": 1, "model": 2, "datasets": 2, "algos": 3, "stages": 4, "pipeline": 5, "cli": 6,
          "__main__": 6, "__init__": 6}  # fmt: skip
MAX_LINES = 500


def modules() -> dict[str, str]:
    """Dotted module name (relative to the package) -> file path, for every .py file in engine/."""
    out = {}
    for folder, _, files in os.walk(ENGINE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ENGINE)[: -len(".py")].replace(os.sep, ".")
                out[rel.removesuffix(".__init__") if rel != "__init__" else "__init__"] = path
    return out


def imports(module: str, path: str) -> list[tuple[str, int]]:
    """(imported module relative to the package, line) for every import of the package's own code."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module.split(".")[:-1] if not path.endswith("__init__.py") else module.split(".")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] if node.module else [".".join(base + [a.name]) for a in node.names]
            found += [(t, node.lineno) for t in names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlhf_engine"):
            found.append(("ABSOLUTE:" + node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [("ABSOLUTE:" + a.name, node.lineno) for a in node.names if a.name.startswith("rlhf_engine")]
    return found


def part(module: str) -> str:
    return module.split(".")[0]


ALL = modules()


def test_every_import_points_down_the_layers():
    wrong = []
    for module, path in ALL.items():
        for target, line in imports(module, path):
            if target.startswith("ABSOLUTE:"):
                wrong.append(f"{path}:{line}: absolute import of the package's own code ({target[9:]}); use a relative one")
                continue
            src, dst = part(module), part(target)
            if src == dst:
                continue
            if LAYERS[dst] >= LAYERS[src]:
                wrong.append(f"{path}:{line}: {module} ({src}) imports {target} ({dst}): not a lower layer")
    assert not wrong, "\n".join(wrong)


def test_a_stage_never_imports_another_stage():
    stages = {m for m in ALL if part(m) == "stages" and m != "stages"}
    wrong = []
    for module in stages:
        name = module.split(".")[1]
        own = name if name.endswith("_config") else f"{name}_config"  # a stage may read its own config
        for target, line in imports(module, ALL[module]):
            if part(target) != "stages" or target == module:
                continue
            other = target.split(".")[1] if "." in target else ""
            if other in (own, "supervised_config") and (name.endswith("_config") or other == own):
                continue
            wrong.append(f"{ALL[module]}:{line}: {module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_model_layer_does_not_import_the_demo_world():
    # (also implied by the layers; kept explicit because it was the case before: the world's tokenizer ships as a file)
    for module, path in ALL.items():
        if part(module) == "model":
            assert not [t for t, _ in imports(module, path) if part(t) in ("pipeline", "datasets")], module


def test_no_file_is_longer_than_a_reader_can_hold():
    long = {m: n for m, p in ALL.items() if (n := sum(1 for _ in open(p, encoding="utf-8"))) > MAX_LINES}
    assert not long, long


def test_configs_and_the_parser_import_no_torch():
    # `python -m engine <stage> --help` and a bad flag must stay fast: every config, the choices they
    # validate against and the whole parser are pure Python
    configs = sorted(f"rlhf_engine.{m}" for m in ALL if m.endswith("_config") or m in ("model.config", "algos.choices"))
    code = ("import sys\n" + "".join(f"import {m}\n" for m in configs) +
            "import rlhf_engine.cli as c\nc.build_parser()\nprint(sorted(m for m in ('torch', 'numpy', 'transformers') "
            "if m in sys.modules))\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_each_choice_has_one_registry():
    import rlhf_kernels
    from rlhf_engine.algos import advantages, choices
    from rlhf_engine.core.config import BACKENDS

    assert tuple(advantages.ESTIMATORS) == choices.ADVANTAGES
    assert set(choices.GROUP_ADVANTAGES) < set(choices.ADVANTAGES)
    assert BACKENDS == ("auto", *rlhf_kernels.BACKENDS)  # the configs' list is the kernels' own


@pytest.mark.parametrize("folder", ["core", "model", "datasets", "algos", "stages", "pipeline"])
def test_each_folder_says_what_it_holds_and_may_import(folder):
    doc = ast.get_docstring(ast.parse(open(os.path.join(ENGINE, folder, "__init__.py")).read()))
    assert doc and "import" in doc.lower(), folder
