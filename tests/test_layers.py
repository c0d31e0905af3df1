"""The architecture as a test: base -> data -> core -> methods -> CLI, each importing only what is below it.

- the base (``mmalign.specs``, ``mmalign.optim``, ``mmalign.distributed``: plain torch) imports only the base;
- ``datamodules`` (data) imports nothing from ``mmalign`` but the base;
- the core (``mmalign`` minus the method packages and the CLI) imports data and core only;
- a method package (``mmalign.classify``, ``contrastive``, ``repa``, ``tta``, ``speech``) imports data,
  core and itself, never another method and never the CLI;
- only the CLI (``mmalign.cli``, ``mmalign.__main__``) and the tools (``mmalign.tools``) may import methods
  by name.

Every import statement is read with ``ast``, including those inside functions (lazy imports are
still dependencies). A second test deletes each method folder from a copy of the tree and checks
that everything else still imports and that the CLI still starts. A third imports the pure-torch core
(losses, evaluation, distributed, encoders, models, specs) in a process where ``lightning`` and
``datamodules`` cannot be imported at all.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("classify", "contrastive", "repa", "t2i", "tta", "speech")
CLI = ("mmalign.cli", "mmalign.__main__")
BASE_MODULES = ("mmalign", "mmalign.specs", "mmalign.optim", "mmalign.distributed")
BASE, DATA, CORE, METHOD, TOP = 0, 1, 2, 3, 4


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _layer(module: str) -> tuple[int, str | None]:
    """(layer, method package or None) of a project module."""
    parts = module.split(".")
    if module in BASE_MODULES:
        return BASE, None
    if parts[0] == "datamodules":
        return DATA, None
    if module in CLI or parts[:2] == ["mmalign", "tools"]:
        return TOP, None
    if len(parts) > 1 and parts[1] in METHODS:
        return METHOD, parts[1]
    return CORE, None


def _project_sources():
    for top in ("datamodules", "mmalign"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    yield os.path.join(dirpath, f)


def _imports(path: str) -> list[tuple[int, str]]:
    """(line, absolute module) for every import of a project module in ``path``."""
    module = _module_name(path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # "from pkg import sub" may name a submodule: check both the package and pkg.sub
            names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0] in ("mmalign", "datamodules")]
    return found


def _is_module(name: str) -> bool:
    path = os.path.join(ROOT, *name.split("."))
    return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def test_no_upward_or_sideways_imports():
    bad = []
    for path in _project_sources():
        me = _module_name(path)
        my_layer, my_method = _layer(me)
        for line, target in _imports(path):
            if not _is_module(target):
                continue  # "from pkg import name" of a function: pkg itself was checked
            their_layer, their_method = _layer(target)
            where = f"{os.path.relpath(path, ROOT)}:{line} imports {target}"
            if their_layer > my_layer:
                bad.append(f"upward: {where}")
            elif my_layer == METHOD and their_layer == METHOD and their_method != my_method:
                bad.append(f"sideways: {where}")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def _cycles(top: str) -> list[list[str]]:
    """Import cycles among the modules of ``top`` (lazy imports included); a package and its own
    submodules importing each other (``generate/__init__`` <-> ``generate/shapes``) do not count."""
    graph: dict[str, set[str]] = {}
    for path in _project_sources():
        me = _module_name(path)
        if me.split(".")[0] != top:
            continue
        for _, target in _imports(path):
            if not _is_module(target) or target == me or target.split(".")[0] != top:
                continue
            if me.startswith(target + ".") or target.startswith(me + "."):
                continue
            graph.setdefault(me, set()).add(target)
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_data_layer_has_no_import_cycle_and_no_sibling_helpers():
    assert not _cycles("datamodules"), _cycles("datamodules")
    # a datamodule takes shared helpers from a helper module, never from a sibling datamodule
    datamodules = {"datamodules.image_text", "datamodules.image_label", "datamodules.audio_text"}
    for name in datamodules:
        path = os.path.join(ROOT, *name.split(".")) + ".py"
        siblings = {t for _, t in _imports(path)} & (datamodules - {name})
        assert not siblings, f"{name} imports {siblings}"


def test_the_layer_test_sees_violations(tmp_path):
    """The checker itself works: a data module importing mmalign, and tta importing classify, are flagged."""
    assert _layer("datamodules.stream") == (DATA, None) and _layer("mmalign.tta.pipeline") == (METHOD, "tta")
    assert _layer("mmalign.distributed") == (BASE, None) and _layer("mmalign.evaluation") == (CORE, None)
    assert _layer("mmalign.training.callbacks") == (CORE, None) and _layer("mmalign.cli") == (TOP, None)
    assert _layer("mmalign.tools.tta_stats") == (TOP, None) and _layer("mmalign.quiet") == (CORE, None)
    imports = dict((t, n) for n, t in _imports(os.path.join(ROOT, "mmalign", "tta", "pipeline.py")))
    assert "mmalign.tta.cafa_stats" in imports  # relative imports resolve to absolute modules


CORE_PACKAGES = ("mmalign.losses", "mmalign.evaluation", "mmalign.distributed", "mmalign.encoders", "mmalign.models",
                 "mmalign.specs", "mmalign.optim")

# Every submodule of the given packages, imported in a process whose import system refuses Lightning
# and the data layer outright (a finder placed first on sys.meta_path raises for them), so a lazy
# import inside a function body is not caught, but any import at module level, direct or through
# another module, is.
BLOCKED = r"""
import importlib, importlib.abc, pkgutil, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric", "datamodules"):
            raise ImportError(f"blocked import of {name}")
        return None

sys.meta_path.insert(0, Refuse())
failed = []
for name in sys.argv[1:]:
    try:
        mod = importlib.import_module(name)
        subs = [i.name for i in pkgutil.walk_packages(getattr(mod, "__path__", []), name + ".")]
        for sub in subs:
            importlib.import_module(sub)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("FAILED" if failed else "OK", *failed, sep="\n")
"""


def _import_blocked(modules, extra_path: str | None = None) -> str:
    path = os.pathsep.join(p for p in (extra_path, ROOT) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", BLOCKED, *modules], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=300)
    return res.stdout + res.stderr[-2000:]


def test_core_imports_without_lightning_or_the_data_layer():
    out = _import_blocked(CORE_PACKAGES)
    assert out.startswith("OK"), out


def test_the_blocked_import_check_sees_a_lightning_import(tmp_path):
    """The check itself works: a module that imports Lightning (or the data layer through another module)
    is reported, with the module it tried to import."""
    (tmp_path / "uses_lightning.py").write_text("import lightning.pytorch as pl\n")
    (tmp_path / "uses_data.py").write_text("from mmalign.specs import need\nimport datamodules.shards\n")
    out = _import_blocked(["uses_lightning", "uses_data"], str(tmp_path))
    assert out.startswith("FAILED"), out
    assert "uses_lightning: ImportError: blocked import of lightning" in out
    assert "uses_data: ImportError: blocked import of datamodules" in out


CHECK = r"""
import contextlib, importlib, io, os, pkgutil, shutil, sys

# An editable install would resolve a deleted subpackage from the real tree: only this copy counts.
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
                 and "__editable__" not in type(f).__module__]
failed = []
for method in sys.argv[1:]:
    folder = os.path.join("mmalign", method)
    shutil.move(folder, folder + ".deleted")
    for name in [m for m in sys.modules if m.split(".")[0] in ("mmalign", "datamodules")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    try:
        import datamodules, mmalign
        for pkg in (datamodules, mmalign):
            for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                if not info.name.endswith("__main__"):
                    try:
                        importlib.import_module(info.name)
                    except Exception as exc:
                        failed.append(f"without {method}: {info.name}: {type(exc).__name__}: {exc}")
        from mmalign import cli
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            cli.main(["--help"])
        if "fit" not in out.getvalue() or f"mmalign.{method}" in sys.modules:
            failed.append(f"without {method}: the CLI did not start cleanly: {out.getvalue()[-300:]!r}, "
                          f"imported: {f'mmalign.{method}' in sys.modules}")
    finally:
        shutil.move(folder + ".deleted", folder)
print("FAILED" if failed else "OK", *failed, sep="\n")
"""


@pytest.mark.slow
def test_each_method_folder_deletes_cleanly(tmp_path):
    """In a copy of the tree, delete each method folder in turn: every other module still imports and
    ``python -m mmalign --help`` still works (one process; third-party imports stay cached)."""
    for top in ("datamodules", "mmalign"):
        shutil.copytree(os.path.join(ROOT, top), tmp_path / top, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", CHECK, *METHODS], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=300)
    assert res.stdout.startswith("OK"), res.stdout + res.stderr[-2000:]
