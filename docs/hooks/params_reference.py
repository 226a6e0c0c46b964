"""MkDocs hook: the params reference page, generated from the pydantic schema at build time.

`docs/params.md` holds the marker below; every section of `pipeline.config.Params` replaces it
as a table of keys with their type, schema default, the value in the default params.yaml,
allowed values and the field's docstring, so the page cannot drift from the code.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

MARKER = "<!-- params-reference -->"
ROOT = Path(__file__).resolve().parents[2]


def _flow(value: Any) -> str:
    """A value as it would be written in params.yaml, on one line."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()
    return text.removesuffix("...").strip()


def _constraints(metadata: list[Any]) -> list[str]:
    out = []
    for item in metadata:
        for name, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            bound = getattr(item, name, None)
            if bound is not None and isinstance(item, annotated_types.BaseMetadata):
                out.append(f"{symbol} {bound}")
        if isinstance(item, annotated_types.MinLen):
            out.append(f"at least {item.min_length} item{'s' * (item.min_length != 1)}")
    return out


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The section models an annotation holds (one, or a union such as model's archs)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) is typing.Annotated:
        return _models(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models(arg)]
    return []


def _type(annotation: Any) -> str:
    """A type in params.yaml's words: integer, number, list of ..., one of ..., or null."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        inner, *metadata = args
        bounds = _constraints(metadata)
        return _type(inner) + (f" ({', '.join(bounds)})" if bounds else "")
    if origin is typing.Literal:
        values = ", ".join(f"`{_flow(a)}`" for a in args)
        return values if len(args) == 1 else f"one of {values}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in args)
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return f"mapping of {_type(args[0])} to {_type(args[1])}"
    if annotation is type(None):
        return "`null`"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping (below)"
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _field_type(field: FieldInfo) -> str:
    text = _type(field.annotation)
    bounds = _constraints(field.metadata)
    return text + (f" ({', '.join(bounds)})" if bounds else "")


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default if field.default_factory is None else field.default_factory()
    return f"`{_flow(value)}`"


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def _lookup(tree: Any, dotted: str) -> tuple[bool, Any]:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False, None
        tree = tree[part]
    return True, tree


def yaml_comments(text: str) -> dict[str, str]:
    """The comment beside each key of a params file (and comment lines just below it), by
    dotted key: the description of a key whose field has no docstring."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    last = None
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(stripped)
        if stripped.startswith("#"):
            if last is not None and indent > last[0]:  # a comment continued on the next line
                comments[last[1]] = f"{comments.get(last[1], '')} {stripped[1:].strip()}".strip()
            continue
        if ":" not in stripped:
            last = None
            continue
        key, _, rest = stripped.partition(":")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key.strip()])
        stack.append((indent, key.strip()))
        comment = rest.partition(" #")[2].strip() if " #" in rest else ""
        if comment:
            comments[dotted] = comment
        last = (indent, dotted) if comment else None
    return comments


def _section(
    key: str,
    model: type[BaseModel],
    defaults: dict[str, Any],
    title: str | None = None,
    comments: dict[str, str] | None = None,
) -> list[str]:
    """One table for a section, then one for each nested section below it."""
    lines = [f"### {title or f'`{key}`'}", ""]
    if model.__doc__ and model.__doc__ is not BaseModel.__doc__:
        lines += [" ".join(model.__doc__.split()), ""]
    lines += [
        "| key | type | default | params.yaml | description |",
        "|---|---|---|---|---|",
    ]
    below = []
    for name, field in model.model_fields.items():
        dotted = f"{key}.{name}" if key else name
        found, value = _lookup(defaults, dotted)
        nested = _models(field.annotation)
        if nested and not key:  # a top-level section gets a table of its own
            continue
        shown = f"`{_flow(value)}`" if found else ""
        default = _default(field)
        if nested and _models(field.annotation) and field.annotation in nested:
            default = shown = "(below)"  # a section that is always there: its own table
        lines.append(
            f"| `{dotted}` | {_cell(_field_type(field))} | {_cell(default)} "
            f"| {_cell(shown)} | {_cell(field.description or (comments or {}).get(dotted))} |"
        )
        below += [(dotted, m) for m in nested]
    lines.append("")
    for dotted, nested_model in below:
        lines += _section(dotted, nested_model, defaults, comments=comments)
    return lines


def render(params_file: Path | None = None) -> str:
    """The reference as Markdown: the top-level keys, then one table per section."""
    if str(ROOT) not in sys.path:  # the project's library, also when mkdocs runs from elsewhere
        sys.path.insert(0, str(ROOT))
    from pipeline.config import Params

    text = (params_file or ROOT / "params.yaml").read_text()
    defaults, comments = yaml.safe_load(text), yaml_comments(text)
    lines = _section("", Params, defaults, title="Top level", comments=comments)
    for name, field in Params.model_fields.items():
        models = _models(field.annotation)
        for model in models:
            title = f"`{name}`"
            if len(models) > 1 and "arch" in model.model_fields:
                arch = typing.get_args(model.model_fields["arch"].annotation)[0]
                title = f"`{name}` with `arch: {arch}`"
                if defaults.get(name, {}).get("arch", arch) != arch:  # params.yaml's is another
                    lines += _section(name, model, {}, title=title)
                    continue
            lines += _section(name, model, defaults, title=title, comments=comments)
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, render())
    return markdown
