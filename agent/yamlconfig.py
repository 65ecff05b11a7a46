"""YAML files validated by pydantic models, with errors people can act on.

`parse_yaml(text, file, Model)` returns a validated model or raises `ConfigError` carrying every
problem at once, each as `FILE:LINE:COL: path.to.field: message (hint)`. Positions come from
PyYAML's node marks (`yaml.compose`), so an error points at the line a person has to edit.
Strings may use `${NAME}` / `${NAME:-default}`: the environment, then the systemd credential.
The agent's config and the simulator's profiles both load through here.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file, with the position a person has to look at."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}:{self.column}: {where}{self.message}"


class ConfigError(Exception):
    """The config file cannot be used; `issues` lists every problem found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
Loc = tuple[str | int, ...]


class Positions:
    """YAML marks of every value and key, by path in the document."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.values: dict[Loc, tuple[int, int]] = {}
        self.keys: dict[Loc, tuple[int, int]] = {}

    def issue(self, loc: Loc, message: str, *, key: bool = False) -> ConfigIssue:
        table = self.keys if key else self.values
        probe = loc
        while probe not in table and probe:
            probe = probe[:-1]
        line, col = table.get(probe, self.values.get((), (0, 0)))
        return ConfigIssue(self.file, line + 1, col + 1, _dotted(loc), message)


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _build(node: Node, loc: Loc, pos: Positions, issues: list[ConfigIssue]) -> Any:
    """Plain Python data from a composed YAML node, recording marks and substituting ${ENV}."""
    pos.values[loc] = (node.start_mark.line, node.start_mark.column)
    if isinstance(node, MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in out:
                mark = key_node.start_mark
                issues.append(
                    ConfigIssue(
                        pos.file,
                        mark.line + 1,
                        mark.column + 1,
                        _dotted((*loc, key)),
                        f"duplicate key {key!r}",
                    )
                )
            pos.keys[(*loc, key)] = (key_node.start_mark.line, key_node.start_mark.column)
            out[key] = _build(value_node, (*loc, key), pos, issues)
        return out
    if isinstance(node, SequenceNode):
        return [_build(item, (*loc, i), pos, issues) for i, item in enumerate(node.value)]
    assert isinstance(node, ScalarNode)
    try:
        value = SafeConstructor().construct_object(node)
    except ConstructorError as exc:
        issues.append(pos.issue(loc, f"cannot read this value: {exc.problem}"))
        return None
    if isinstance(value, str) and "${" in value:
        value = _substitute(value, loc, pos, issues)
    return value


def _substitute(text: str, loc: Loc, pos: Positions, issues: list[ConfigIssue]) -> str:
    def one(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        found = os.environ.get(name)
        if found is None:
            found = _credential(name, loc, pos, issues)
        if found is not None:
            return found
        if default is not None:
            return default
        issues.append(
            pos.issue(
                loc,
                f"environment variable {name} is not set and there is no credential {name} "
                f"(hint: export {name}=..., LoadCredential={name}:FILE in the unit, "
                f"or write ${{{name}:-default}})",
            )
        )
        return ""

    return _ENV.sub(one, text)


def _credential(name: str, loc: Loc, pos: Positions, issues: list[ConfigIssue]) -> str | None:
    """The systemd credential `name` (`LoadCredential=`), without its final newline, or None.

    Credentials keep secrets out of the environment, which `/proc/PID/environ` and crash
    reports show; systemd hands them over as files readable by the service only.
    """
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    try:
        return path.read_text(encoding="utf-8").removesuffix("\n")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        issues.append(pos.issue(loc, f"cannot read credential {name} ({path}): {exc}"))
        return ""


def _model_at(model: Any, loc: Loc, data: Any) -> Any:
    """The pydantic model class that describes the mapping at `loc`, for 'did you mean' hints."""
    current: Any = model
    for part in loc:
        data = _step(data, part)
        if isinstance(part, str):
            fields = getattr(current, "model_fields", None)
            if fields is None or part not in fields:
                return None
            current = _strip(fields[part].annotation)
        elif get_origin(current) is list:
            current = _strip(get_args(current)[0])
        else:
            return None
        if get_origin(current) is Union and isinstance(data, dict):
            # A discriminated union: the member is the one whose `type` the data names.
            members = [m for m in get_args(current) if _tag_of(m) == data.get("type")]
            current = members[0] if members else None
    return current


def _strip(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _tags(union: Any) -> tuple[str, ...]:
    return tuple(str(_tag_of(m)) for m in get_args(_strip(union)))


def _union_tags_at(model: Any, loc: Loc) -> tuple[str, ...]:
    """The `type` values the discriminated union at `loc` accepts (for a missing-type hint)."""
    current: Any = model
    for part in loc:
        if isinstance(part, str):
            fields = getattr(current, "model_fields", None)
            if fields is None or part not in fields:
                return ()
            current = _strip(fields[part].annotation)
        elif get_origin(current) is list:
            current = _strip(get_args(current)[0])
        else:
            return ()
    return _tags(current) if get_origin(current) is Union else ()


def _tag_of(model: Any) -> Any:
    field = getattr(model, "model_fields", {}).get("type")
    return get_args(field.annotation)[0] if field is not None else None


def _step(data: Any, part: str | int) -> Any:
    if isinstance(data, dict) and isinstance(part, str):
        return data.get(part)
    if isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
        return data[part]
    return None


def _strip_union_tags(loc: Loc, data: Any) -> Loc:
    """Drop the discriminator values pydantic puts in a union member's error location."""
    out: list[str | int] = []
    current = data
    for part in loc:
        if (
            isinstance(current, dict)
            and isinstance(part, str)
            and part not in current
            and current.get("type") == part
        ):
            continue
        out.append(part)
        current = _step(current, part)
    return tuple(out)


def _from_validation(
    exc: ValidationError, data: Any, pos: Positions, root: type[BaseModel]
) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors():
        loc = _strip_union_tags(tuple(err["loc"]), data)
        kind = err["type"]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if kind == "extra_forbidden":
            model = _model_at(root, loc[:-1], data)
            known = list(getattr(model, "model_fields", {}))
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            issues.append(pos.issue(loc, f"unknown key ({hint})", key=True))
        elif kind == "missing":
            issues.append(pos.issue(loc, "required field is missing"))
        elif kind == "union_tag_invalid":
            issues.append(pos.issue((*loc, "type"), msg))
        elif kind == "union_tag_not_found":
            tags = ", ".join(_union_tags_at(root, loc))
            issues.append(pos.issue(loc, f"needs a 'type' key, one of: {tags}"))
        else:
            issues.append(pos.issue(loc, msg))
    return issues


def parse_yaml(
    text: str,
    file: str,
    model: type[M],
    cross_checks: Callable[[M, Positions], list[ConfigIssue]] | None = None,
    *,
    shape: str = "the file must be a mapping",
) -> M:
    """Validate YAML text against `model`; raise ConfigError with every problem found.

    `cross_checks` runs on a valid model for what one field cannot know alone (duplicate
    names, references); `shape` is the message when the document is not a mapping.
    """
    pos = Positions(file)
    issues: list[ConfigIssue] = []
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = f"not valid YAML: {exc.problem}"
        raise ConfigError([ConfigIssue(file, line, col, "", problem)]) from exc
    data = {} if root is None else _build(root, (), pos, issues)
    if not isinstance(data, dict):
        raise ConfigError([pos.issue((), shape)])
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        issues.extend(_from_validation(exc, data, pos, model))
        raise ConfigError(sorted(issues, key=lambda i: (i.line, i.column))) from None
    if cross_checks is not None:
        issues.extend(cross_checks(parsed, pos))
    if issues:
        raise ConfigError(sorted(issues, key=lambda i: (i.line, i.column)))
    return parsed


def read_yaml_text(path: str | Path) -> str:
    """A config file's text, or ConfigError saying why it cannot be read."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(p), 0, 0, "", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue(str(p), 0, 0, "", "not UTF-8 text")]) from None
