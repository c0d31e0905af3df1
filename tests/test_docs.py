"""The README and the reference pages under docs/ stay true to the code.

- The quick start is exactly the two commands users and CI run, and the README's test command is the
  one ``.ci/run`` runs.
- Every option of a module or datamodule (each field of each spec group) has a row in its page, so an
  option added to the code without documentation fails here, naming it.
- Every config and script a page names exists, and every relative link (file and ``#anchor``) resolves.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_START = [
    'pip install -e ".[text]" && python -m mmalign weights fetch mobilenetv2 && python -m mmalign fit -c '
    "configs/clip/shapes_clip.yaml",
    "bash .ci/run",
]
#: the pages this test checks (other pages under docs/ are checked by their own tests, if any)
PAGES = ["README.md", "docs/benchmarks.md", "docs/classify.md", "docs/contrastive.md", "docs/data.md",
         "docs/extending.md", "docs/running.md", "docs/speech.md"]
#: pages the README links to that are written on other branches of the same change (issue 28); a link to
#: one of them is checked like any other as soon as the file exists
WRITTEN_ELSEWHERE = {"docs/cli.md", "docs/diffusion.md", "docs/performance.md", "docs/recipes.md", "docs/tta.md"}


def _read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _blocks(text: str, after: str) -> list[list[str]]:
    """The fenced code blocks of the section whose heading is ``after``, as lists of lines."""
    section = text.split(after, 1)[1].split("\n## ", 1)[0]
    return [b.strip().splitlines() for b in re.findall(r"```[a-z]*\n(.*?)```", section, re.S)]


def test_quick_start_is_the_two_commands_and_the_test_command_is_what_ci_runs():
    readme = _read("README.md")
    blocks = _blocks(readme, "\n## Quick start\n")
    assert blocks[0] == QUICK_START, blocks[0]
    ci = [line.strip() for line in _read(".ci/run").splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1] == "python -m pytest -q" and blocks[1] == [ci[-1]], (ci[-1], blocks[1])
    assert os.path.isfile(os.path.join(ROOT, "configs/clip/shapes_clip.yaml"))


def _spec_keys(group: str, spec: type) -> list[str]:
    return [f"{group}.{f.name}" for f in dataclasses.fields(spec)]


def _module_keys(cls: type) -> list[str]:
    """``group.field`` for every spec argument of ``cls``, the bare name for the other arguments."""
    keys = []
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self":
            continue
        default = param.default
        keys += _spec_keys(name, type(default)) if dataclasses.is_dataclass(default) else [name]
    return keys


def _key_cells(text: str) -> list[str]:
    """First cells of the rows of option tables (a header whose first cell is ``key``): a key counts as
    documented there, not where prose or another table mentions it."""
    cells, in_options, previous = [], False, ""
    for line in text.splitlines():
        if not line.startswith("|"):
            in_options, previous = False, ""
            continue
        first = line.split("|")[1].strip()
        if set(first) <= set("-: "):  # the separator row: the previous row was the header
            in_options = previous == "key"
        elif in_options:
            cells.append(first)
        previous = first
    return cells


def _documented(cls_or_keys, page: str, skip: tuple[str, ...] = (), text: str | None = None) -> None:
    text = _read(page) if text is None else text
    keys = cls_or_keys if isinstance(cls_or_keys, list) else _module_keys(cls_or_keys)
    rows = " ".join(_key_cells(text))
    missing = [k for k in keys if k not in skip and f"`{k}`" not in rows]
    assert not missing, f"{page} has no row for {missing}: add them to its option table"


def test_every_contrastive_option_is_documented():
    from mmalign.contrastive import ContrastiveModule

    _documented(ContrastiveModule, "docs/contrastive.md")


def test_every_speech_option_is_documented():
    from mmalign.speech import SpeechTextAligner

    # optim is the shared OptimSpec, documented once in contrastive.md (checked there)
    _documented(SpeechTextAligner, "docs/speech.md", skip=tuple(_spec_keys("optim", _optim_spec())))


def test_every_classifier_option_is_documented():
    from mmalign.classify import ImageClassifier

    _documented(ImageClassifier, "docs/classify.md", skip=tuple(_spec_keys("optim", _optim_spec())))


def _optim_spec() -> type:
    from mmalign.specs import OptimSpec

    return OptimSpec


def test_every_datamodule_option_is_documented():
    from datamodules import AudioTextDataModule, ImageLabelDataModule, ImageTextDataModule

    keys: list[str] = []
    for cls in (ImageTextDataModule, ImageLabelDataModule, AudioTextDataModule):
        keys += [k for k in _module_keys(cls) if k not in keys]
    # generate takes a bare name or the spec; its fields are documented as generate.name / generate.kwargs
    from datamodules.specs import GenerateSpec

    keys = [k for k in keys if k != "generate"] + _spec_keys("generate", GenerateSpec)
    _documented(keys, "docs/data.md")


def test_the_option_check_sees_an_undocumented_option():
    """The check itself: a spec field missing from the page is named."""

    @dataclasses.dataclass(frozen=True)
    class Spec:
        documented: int = 1
        brand_new: int = 2

    class Module:
        def __init__(self, things: Spec = Spec(), compile: bool = False) -> None: ...

    page = ("| key | default | meaning |\n|---|---|---|\n| `things.documented` | 1 | ... |\n| `compile` | false | ... |\n"
            "\nProse naming `things.brand_new`.\n\n| when | what |\n|---|---|\n| `things.brand_new` changed | ... |\n")
    with pytest.raises(AssertionError, match=r"\['things.brand_new'\]"):
        _documented(Module, "page.md", text=page)
    _documented(Module, "page.md", text=page.replace("| `compile` |", "| `things.brand_new` | 2 | ... |\n| `compile` |"))


PATH = re.compile(r"(?<![\w/.-])((?:configs|scripts)/[\w/.-]+\.(?:yaml|py|sh))")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(text: str) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES)
def test_named_files_and_links_exist(page):
    text = _read(page)
    missing = sorted({p for p in PATH.findall(text) if not os.path.exists(os.path.join(ROOT, p))})
    assert not missing, f"{page} names files that do not exist: {missing}"
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(ROOT, resolved)):
            if resolved not in WRITTEN_ELSEWHERE:
                broken.append(target)
            continue
        if anchor and resolved.endswith(".md") and anchor not in _anchors(_read(resolved)):
            broken.append(target)
    assert not broken, f"{page} has broken links: {broken}"
