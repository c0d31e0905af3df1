"""Class names and prompt templates for zero-shot evaluation, kept as data files.

A *class spec* file is JSON (``.json``) or YAML (``.yaml`` / ``.yml``) with two keys::

    {"classnames": ["airplane", "automobile", ...],
     "templates": ["a photo of a {}.", "a blurry photo of a {c}.", ...]}

``templates`` may be left out; the generic list shipped in ``mmalign/data/prompts/default.json``
is used instead, so a data set only has to list its class names. A template names the class
with ``{}`` or ``{c}`` (one or more times); literal braces are written ``{{`` and ``}}`` as in
``str.format``. Any other field (``{0}``, ``{name}``, ``{c.upper}``) is rejected on load rather
than failing halfway through building zero-shot weights.
"""

from __future__ import annotations

import json
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "ClassSpec",
    "load_class_spec",
    "load_templates",
    "default_templates",
    "format_prompts",
    "validate_template",
    "packaged_spec_path",
]

_PLACEHOLDERS = ("", "c")  # "{}" parses to field name "", "{c}" to "c"
_SUFFIXES = {".json", ".yaml", ".yml"}


def validate_template(template: str) -> None:
    """Raise ``ValueError`` unless ``template`` is a string with at least one ``{}``/``{c}`` field
    and no other format fields."""
    if not isinstance(template, str):
        raise ValueError(f"template must be a string, got {type(template).__name__}: {template!r}")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as err:  # unbalanced braces
        raise ValueError(f"template {template!r} is not a valid format string ({err}); "
                         "write literal braces as '{{' and '}}'") from err
    if not fields:
        raise ValueError(f"template {template!r} has no class-name placeholder; add '{{}}' or '{{c}}'")
    for name, spec, conv in fields:
        if name not in _PLACEHOLDERS or spec or conv:
            raise ValueError(f"template {template!r} has an unsupported field {{{name}}}; "
                             "only '{}' and '{c}' (no format spec or conversion) are allowed")


def format_prompts(templates: Sequence[str], classname: str) -> list[str]:
    """Fill every template with ``classname``; the result keeps the template order."""
    if isinstance(templates, str):  # a lone string would be iterated character by character
        raise TypeError("templates must be a sequence of strings, not a single string")
    if not isinstance(classname, str) or not classname.strip():
        raise ValueError(f"classname must be a non-empty string, got {classname!r}")
    prompts = []
    for template in templates:
        validate_template(template)
        # Passing the name both positionally and as ``c`` serves both placeholder spellings.
        prompts.append(template.format(classname, c=classname))
    return prompts


def _check_strings(values: Any, what: str, source: str) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(f"{source}: '{what}' must be a list of strings, got {type(values).__name__}")
    if len(values) == 0:
        raise ValueError(f"{source}: '{what}' is empty; list at least one entry")
    for i, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{source}: '{what}'[{i}] must be a non-empty string, got {value!r}")
    duplicates = sorted(v for v, n in Counter(values).items() if n > 1)
    if duplicates:
        # Duplicate class names make two columns of the classifier identical, so argmax between
        # them is arbitrary; duplicate templates silently reweight the prompt ensemble.
        raise ValueError(f"{source}: '{what}' has duplicates: {duplicates}")
    return tuple(values)


@dataclass(frozen=True)
class ClassSpec:
    """Class names (index ``i`` is label ``i``) and the prompt templates used for every class."""

    classnames: tuple[str, ...]
    templates: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "classnames", _check_strings(self.classnames, "classnames", "ClassSpec"))
        object.__setattr__(self, "templates", _check_strings(self.templates, "templates", "ClassSpec"))
        for template in self.templates:
            validate_template(template)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, index: int) -> list[str]:
        """All prompts for class ``index``."""
        return format_prompts(self.templates, self.classnames[index])


def _read_mapping(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        import yaml  # only needed for YAML specs; keeps JSON-only use free of the import

        return yaml.safe_load(text)
    except Exception as err:  # json.JSONDecodeError / yaml.YAMLError: say which file broke
        raise ValueError(f"could not parse {path}: {err}") from err


def _resolve(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        hint = "" if path.exists() else " (file does not exist)"
        raise FileNotFoundError(f"class spec {str(path)!r} is not a readable file{hint}; "
                                f"pass a .json/.yaml file or one of the packaged names via packaged_spec_path()")
    if path.suffix.lower() not in _SUFFIXES:
        raise ValueError(f"class spec {str(path)!r} has suffix {path.suffix!r}; expected one of {sorted(_SUFFIXES)}")
    return path


def packaged_spec_path(name: str) -> Path:
    """Path of a spec shipped in ``mmalign/data/prompts`` (``"default"`` -> ``default.json``)."""
    folder = resources.files("mmalign").joinpath("data", "prompts")
    candidate = Path(str(folder.joinpath(name if name.endswith(".json") else f"{name}.json")))
    if not candidate.is_file():
        shipped = sorted(p.stem for p in Path(str(folder)).glob("*.json"))
        raise FileNotFoundError(f"no packaged prompt file named {name!r}; shipped: {shipped}")
    return candidate


def _templates_from(data: dict, source: Path) -> tuple[str, ...]:
    templates = _check_strings(data["templates"], "templates", str(source))
    for template in templates:
        try:
            validate_template(template)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err
    return templates


def load_templates(path: str | Path) -> tuple[str, ...]:
    """Read only the ``templates`` list of a spec file (``classnames`` may be absent)."""
    path = _resolve(path)
    data = _read_mapping(path)
    if not isinstance(data, dict) or "templates" not in data:
        raise ValueError(f"{path}: expected a mapping with a 'templates' list")
    return _templates_from(data, path)


def default_templates() -> tuple[str, ...]:
    """The generic template list shipped with mmalign."""
    return load_templates(packaged_spec_path("default"))


def load_class_spec(path: str | Path) -> ClassSpec:
    """Load and validate a class spec file; see the module docstring for the format."""
    path = _resolve(path)
    data = _read_mapping(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with 'classnames' and 'templates', got {type(data).__name__}")
    unknown = sorted(set(data) - {"classnames", "templates"})
    if unknown:  # a typo such as "template" would otherwise fall back to the defaults silently
        raise ValueError(f"{path}: unknown keys {unknown}; allowed: 'classnames', 'templates'")
    if "classnames" not in data:
        raise ValueError(f"{path}: missing the 'classnames' list")
    classnames = _check_strings(data["classnames"], "classnames", str(path))
    if "templates" in data:
        templates = _templates_from(data, path)
    else:
        templates = default_templates()
    return ClassSpec(classnames=classnames, templates=templates)
