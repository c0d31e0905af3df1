"""Class labels as users write them, and the class-index files that give names their indices.

A label may be spelled ``3``, `` 3\\n`` or ``3.0`` (a ``.cls`` member or a json number), or be a class name
(``cat``, an ImageNet wnid) that a class-index file maps to its index. Anything else — ``3.5``, ``-1``, a
name without a class-index file, a name the file does not hold, ``true`` — is a wrong column or a wrong
file, never a label to guess: ``DataConfigError`` with one line naming the sample and the fix.
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache

from .errors import DataConfigError


def parse_label(value, class_map: dict[str, int] | None, where: str) -> int:
    """The class index ``value`` spells (a ``.cls`` text, a json value); see the module docstring."""
    if isinstance(value, bool) or value is None:
        raise DataConfigError(f"{where}: label {value!r} is not a class index. Point label.key at the member or json "
                              "field that holds the class (a whole number >= 0, or a name with label.classes).")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            if class_map is None:
                raise DataConfigError(f"{where}: label {text!r} is not a number. Set label.classes to a class-index "
                                      "file that maps class names to indices, or point label.key at the index."
                                      ) from None
            if text not in class_map:
                shown = ", ".join(list(class_map)[:5])
                raise DataConfigError(f"{where}: class {text!r} is not in the class-index file ({len(class_map)} "
                                      f"classes: {shown}, ...). Add it, or fix the label.") from None
            return class_map[text]
    if not math.isfinite(number) or number != int(number) or number < 0:
        raise DataConfigError(f"{where}: label {value!r} is not a class index (a whole number >= 0). Fix the label, "
                              "or point label.key at the member that holds it.")
    return int(number)


@lru_cache(maxsize=16)
def read_class_index(path: str) -> dict[str, int]:
    """``{name: index}`` from a class-index file: a JSON list of names (index = position), a JSON mapping
    ``name -> index``, a class-spec JSON (``{"classnames": [...]}``, what the generators and the shard
    converter write), or a text file with one class per line (its first word: ImageNet's
    ``LOC_synset_mapping.txt`` or a plain list of wnids)."""
    fix = ("a class-index file is a JSON list of names, a JSON {name: index} mapping, {\"classnames\": [...]}, "
           "or a text file with one class per line")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataConfigError(f"label.classes: cannot read '{path}' ({exc}); {fix}.") from None
    if path.endswith(".json") or text.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DataConfigError(f"label.classes: '{path}' is not valid JSON ({exc}); {fix}.") from None
        if isinstance(data, dict) and isinstance(data.get("classnames"), list):
            data = data["classnames"]
        if isinstance(data, list) and all(isinstance(n, str) for n in data):
            names = {n: i for i, n in enumerate(data)}
            if len(names) != len(data):
                raise DataConfigError(f"label.classes: '{path}' names a class twice; {fix}.")
            return names
        if isinstance(data, dict) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                          for v in data.values()):
            return dict(data)
        raise DataConfigError(f"label.classes: '{path}' holds neither a list of names nor name -> index; {fix}.")
    names = [line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not names or len(set(names)) != len(names):
        raise DataConfigError(f"label.classes: '{path}' lists {'no class' if not names else 'a class twice'}; {fix}.")
    return {n: i for i, n in enumerate(names)}


def class_map_for(path: str | None, data_root: str | None) -> dict[str, int] | None:
    if path is None:
        return None
    if data_root is not None and not os.path.isabs(path):
        path = os.path.join(data_root, path)
    return read_class_index(os.path.abspath(path))
