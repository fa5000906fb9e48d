"""Config plumbing shared by every layer: dataclasses from dicts, TOML presets, overrides,
and the format version of the files a run writes.

Rules (docs/design.md, "Conventions"): a config is a dataclass validated when built; an
unknown key is an error naming the key and the valid ones; presets are TOML files shipped
in the package; CLI overrides are ``section.key=value``. A config class may define its own
``from_dict(data, where)`` (e.g. to translate older keys) and nested values their own
``to_dict()``; the generic functions here call them.
"""

from __future__ import annotations

import ast
import dataclasses
import tomllib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Version of the files a run writes (config.json, checkpoint state.json). 1 is longctx 0.1,
# whose files carry no version and a flat [model] table; 2 nests [model.attention] and
# [model.ffn]. Older versions are translated when read; newer ones are refused.
FORMAT_VERSION = 2


def check_format_version(version: object, what: str) -> int:
    """The format version of a file (``what`` names it in errors): older ones are fine
    (they are translated), a newer one is a clear error."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{what}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{what} has format version {version}: it was written by a newer longctx, and "
            f"this one ({_package_version()}) reads versions up to {FORMAT_VERSION}; upgrade "
            "longctx to read it"
        )
    return version


def check_choices(obj: Any, where: str, **allowed: tuple) -> None:
    """ValueError unless each named field of the config ``obj`` is one of its allowed
    values (``where``: the table, e.g. ``model.attention``)."""
    for name, choices in allowed.items():
        value = getattr(obj, name)
        if value not in choices:
            raise ValueError(f"{where}.{name} must be one of {choices}, got {value!r}")


def check_bools(obj: Any, where: str, *names: str) -> None:
    """ValueError unless each named field of the config ``obj`` is true or false (a
    config built in Python is not coerced as one read from a file is)."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, bool):
            raise ValueError(f"{where}.{name} must be true or false, got {value!r}")


def _package_version() -> str:
    from . import __version__

    return __version__


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ValueError.

    ``where`` is the dotted path of this table ("" for the top level), used in messages.
    """
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'the config'} must be a table of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys in {where or 'the config'}: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """A config dataclass as plain data (nested values with a ``to_dict`` use theirs)."""
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict") and not isinstance(value, type):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if "from_dict" in vars(hint):  # the class reads its own table (e.g. older keys)
            return hint.from_dict(value, where)
        return from_dict(hint, value, where)
    return value


class Registry:
    """The kinds of a config table chosen by its ``kind`` key (attention patterns,
    feed-forward kinds): dataclasses that subclass ``base``, whose fields are the table's
    keys, with a class attribute ``kind``. ``hint`` ends the error for an unknown kind."""

    def __init__(self, base: type, default: str, hint: str = ""):
        self.base, self.default, self.hint = base, default, hint
        self._kinds: dict[str, type] = {}

    def register(self, cls: type) -> type:
        """Class decorator: make ``cls`` available by its ``kind`` (a kind registered
        again is replaced)."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"register needs a subclass of {self.base.__name__}, got {cls!r}")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass (its fields are its keys)")
        if not isinstance(getattr(cls, "kind", None), str) or not cls.kind:
            raise TypeError(f"{cls.__name__} needs a class attribute kind = '<name>'")
        self._kinds[cls.kind] = cls
        return cls

    def names(self) -> tuple[str, ...]:
        """The registered kinds."""
        return tuple(sorted(self._kinds))

    def get(self, kind: str) -> type:
        """The class registered as ``kind``."""
        if kind not in self._kinds:
            raise ValueError(f"unknown kind {kind!r}; registered: {', '.join(self.names())}")
        return self._kinds[kind]

    def make(self, spec: Any, where: str) -> Any:
        """An instance from a kind name, a table ``{"kind": ..., **keys}`` (keys checked
        against the kind's fields) or an instance (returned as is)."""
        if isinstance(spec, self.base):
            return spec
        if isinstance(spec, str):
            spec = {"kind": spec}
        if not isinstance(spec, dict):
            raise ValueError(f"{where} must be a kind name or a table of keys, got {spec!r}")
        keys = dict(spec)
        kind = keys.pop("kind", self.default)
        if kind not in self._kinds:
            raise ValueError(f"{where} must be one of {self.names()}, got {kind!r}{self.hint}")
        return from_dict(self._kinds[kind], keys, where)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value). The value is read as a Python
    or TOML literal where it parses (numbers, true/false, lists), else as a string."""
    if "=" not in text:
        raise ValueError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ValueError(f"--set expects section.key=value, got {text!r}")
    raw = raw.strip()
    lowered = {"true": True, "false": False, "none": None, "null": None}
    if raw.lower() in lowered:
        return path, lowered[raw.lower()]
    try:
        return path, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return path, raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a nested dict (in place; returned)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def preset_names() -> list[str]:
    """The presets shipped in the package."""
    folder = resources.files("longctx") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> dict[str, Any]:
    """A shipped preset's table (ValueError naming the presets for an unknown one)."""
    names = preset_names()
    if name not in names:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(names)}")
    text = (resources.files("longctx") / "presets" / f"{name}.toml").read_text()
    return tomllib.loads(text)


def load_toml(path: Path) -> dict[str, Any]:
    """A TOML file's table (ValueError for a missing or invalid file)."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
