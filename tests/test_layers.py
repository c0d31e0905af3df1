"""The architecture as a test: data -> core -> methods -> CLI, each importing only what is below it.

- ``datamodules`` (data) imports nothing from ``mmalign``;
- the core (``mmalign`` minus the method packages and the CLI) imports data and core only;
- a method package (``mmalign.classify``, ``contrastive``, ``repa``, ``tta``, ``speech``) imports data,
  core and itself, never another method and never the CLI;
- only the CLI (``mmalign.cli``, ``mmalign.__main__``) may import methods by name.

Every import statement is read with ``ast``, including those inside functions (lazy imports are
still dependencies). A second test deletes each method folder from a copy of the tree and checks
that everything else still imports and that the CLI still starts.
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
DATA, CORE, METHOD, TOP = 0, 1, 2, 3


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _layer(module: str) -> tuple[int, str | None]:
    """(layer, method package or None) of a project module."""
    parts = module.split(".")
    if parts[0] == "datamodules":
        return DATA, None
    if module in CLI:
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


def test_the_layer_test_sees_violations(tmp_path):
    """The checker itself works: a data module importing mmalign, and tta importing classify, are flagged."""
    assert _layer("datamodules.stream") == (DATA, None) and _layer("mmalign.tta.pipeline") == (METHOD, "tta")
    assert _layer("mmalign.training.callbacks") == (CORE, None) and _layer("mmalign.cli") == (TOP, None)
    imports = dict((t, n) for n, t in _imports(os.path.join(ROOT, "mmalign", "tta", "pipeline.py")))
    assert "mmalign.tta.cafa_stats" in imports  # relative imports resolve to absolute modules


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
