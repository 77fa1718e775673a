"""One-line errors: what the user sees when a command fails, with suggestions for mistyped options."""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
from collections.abc import Iterable

DEBUG_ENV = "SSL_LIGHTNING_DEBUG"


class ConfigError(ValueError):
    """The command line or a config file is wrong (unknown or mistyped option, bad value)."""


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether the full traceback is wanted (``--debug`` or ``SSL_LIGHTNING_DEBUG=1``), and ``argv`` without
    ``--debug``."""
    wanted = os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")
    return wanted or "--debug" in argv, [arg for arg in argv if arg != "--debug"]


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (a multi-line message is joined with ``; ``)."""
    text = str(error).strip() or type(error).__name__
    if "Does not validate against any of the Union subtypes" in text:  # an error raised inside a class's __init__
        causes = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]
        causes = [c for c in causes if not c.startswith(("Expected a <class 'NoneType'>", "Not a valid subclass"))]
        text = "\n".join(causes) or text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    message = "; ".join(lines)
    name = type(error).__name__
    return message if name in ("ArgumentError", "ValueError", "ConfigError", "RunFolderError", "ResumeError") else f"{name}: {message}"


PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
GIVEN = re.compile(r"Given value: (.*)")
EXPECTED = re.compile(r"Expected an? (<class '([^']+)'>|\S+)")
NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
CLASS_PATH = re.compile(r"class_path '([^']+)'")
NOT_A_CLASS = re.compile(r"Expected a dot import path string: (\S+)")
AMBIGUOUS = re.compile(r"Multiple subclasses with name .*")
KIND_OF = {"model": "methods", "data": "datamodules"}


def chain_text(error: BaseException) -> str:
    """The messages of ``error`` and of every exception that caused it."""
    texts = []
    while error is not None:
        texts.append(str(error))
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return "\n".join(texts)


def init_argument_names(class_path: str) -> list[str]:
    """The ``__init__`` argument names of a class and its bases (``**kwargs`` are passed on to the bases)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names = []
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names += [p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "args", "kwargs")]
    return list(dict.fromkeys(names))


def describe_parse_error(error: BaseException) -> str:
    """jsonargparse's many-line explanation of a bad config, as one line naming the key and value at fault.

    Unknown method arguments and class names get the closest valid names; other messages are summarized as
    ``key a.b: given X, expected T``."""
    text = chain_text(error)
    keys = PARSER_KEY.findall(text)
    key = keys[0] if keys else ""
    option, class_path = NOT_ACCEPTED.search(text), CLASS_PATH.search(text)
    if option and class_path:
        valid = init_argument_names(class_path.group(1))
        close = closest_options(option.group(1), valid)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; its arguments: {', '.join(valid)}"
        return f"--{key}.init_args.{option.group(1)}: {class_path.group(1).rsplit('.', 1)[-1]} has no such argument{hint}"
    unknown_class = NOT_A_CLASS.search(text)
    if unknown_class and key in KIND_OF:
        from ssl_lightning.cli.help import exported_names

        names = exported_names(KIND_OF[key])
        close = closest_options(unknown_class.group(1), names)
        hint = f"did you mean {' or '.join(close)}?" if close else f"known: {', '.join(names)}"
        return f"--{key}: unknown class {unknown_class.group(1)!r}; {hint}"
    ambiguous = AMBIGUOUS.search(text)
    if ambiguous:
        return f"key {key}: {ambiguous.group(0)}"
    given = GIVEN.search(text)
    if not keys or not given:
        return str(error)
    expected = [match.group(2) or match.group(1) for match in EXPECTED.finditer(text)]
    wanted = " or ".join(dict.fromkeys(e for e in expected if e != "NoneType")) or "another value"
    return f"key {'.'.join(dict.fromkeys(keys))}: given {given.group(1).strip()}, expected {wanted}"


UNRECOGNIZED = re.compile(r"unrecognized arguments:\s*(.*)", re.IGNORECASE)


def unknown_options(message: str) -> list[str]:
    """The options a parser error calls unrecognized (``--trainer.max_epoch`` of ``--trainer.max_epoch 1``)."""
    found = UNRECOGNIZED.search(message)
    if not found:
        return []
    return [word.split("=", 1)[0] for word in found.group(1).split() if word.startswith("--")]


def closest_options(option: str, valid: Iterable[str], count: int = 3) -> list[str]:
    """The valid option names closest to a mistyped one (difflib ratio)."""
    return difflib.get_close_matches(option, list(valid), n=count, cutoff=0.6)


def with_suggestions(message: str, valid: Iterable[str]) -> str:
    """``message`` plus, for each unrecognized option in it, the closest valid names."""
    valid = list(valid)
    hints = []
    for option in unknown_options(message):
        close = closest_options(option, valid)
        hints.append(f"{option}: did you mean {' or '.join(close)}?" if close else f"{option}: no similar option")
    return message if not hints else f"{message} ({'; '.join(hints)})"
