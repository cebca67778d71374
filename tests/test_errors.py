"""meterstream.errors: the drawing in its docstring is the whole tree, parents included."""

from __future__ import annotations

import inspect
import re

from meterstream import errors
from meterstream.errors import MeterstreamError


def _drawn() -> dict[str, int]:
    """Each class name the docstring draws, with its depth (column of its name)."""
    doc = errors.__doc__ or ""
    found: dict[str, int] = {}
    for line in doc.splitlines():
        match = re.match(r"^((?:[ |]*\+-- )?)([A-Z]\w*Error)\b", line)
        if match and (match.group(1) or line.strip() == "MeterstreamError"):
            found[match.group(2)] = len(match.group(1))
    return found


def test_the_drawing_holds_every_error_class_under_its_parent() -> None:
    # By the class's own name: an alias would be the class it names, drawn once.
    classes = {
        cls.__name__: cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, MeterstreamError)
    }
    drawn = _drawn()
    assert set(drawn) == set(classes)
    for name, cls in classes.items():
        if cls is MeterstreamError:
            continue
        parent = cls.__mro__[1].__name__
        # Drawn one level (5 columns) right of its parent.
        assert drawn[name] == drawn[parent] + 5, name
