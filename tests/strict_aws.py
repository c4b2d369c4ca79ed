"""A strict stand-in for SageMaker's request validation, which moto does not do.

moto accepts any job name, any length, any enum value. The real service checks every request against its model:
each string's pattern, min and max length and enum, each number's range, each list's and map's size, and the
required members, all the way down. botocore's own ParamValidator checks types, required members and minimums, but
not patterns, maximum lengths or enums. `install(events)` walks botocore's service model (botocore.model shapes) for
every request to SERVICES before it is built, and refuses what the service would refuse with a ClientError
ValidationException that names the field, as the service does:

    1 validation error detected: Value 'unet_seg-2024-...' at 'trainingJobName' failed to satisfy constraint:
    Member must satisfy regular expression pattern: [a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}

Patterns: the service validates with Java regexes and a full match (String.matches), which is why 'unet_seg' fails
`[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}` although the pattern is unanchored in botocore's model (and shown as ^... in the
API reference). Every pattern is therefore applied with a full match here. Java's Unicode classes (\\p{L}, \\p{N},
\\p{Alnum}: tag keys and values, descriptions) need the `regex` module, which moto[server] installs (constraints.txt
pins it); without it those few patterns go unchecked. Java's UTF-16 surrogate-pair range for characters beyond the
BMP is rewritten to Python's \\U0001_0000-\\U0010_FFFF.

Field paths follow the service: lowerCamelCase members joined by dots, list items as `<list>.<n>.member` (n from
1), and map entries as `<map>.<key>` (the service names only the map; the key is more use in a failing test).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import Any, Optional

from botocore.exceptions import ClientError

try:
    import regex as _unicode_regex
except ImportError:  # pragma: no cover - moto[server] brings it
    _unicode_regex = None

# Every operation of these services is checked: SageMaker, its runtime (InvokeEndpointAsync), what the
# scale-to-zero setup of an async endpoint calls (Application Auto Scaling, CloudWatch), and what `unetseg image push`
# calls (ECR, STS). Names as botocore's events spell them (the service id, hyphenated).
SERVICES = ("sagemaker", "sagemaker-runtime", "application-auto-scaling", "cloudwatch", "ecr", "sts")
_JAVA_SUPPLEMENTARY_RANGE = r"\uD800\uDC00-\uDBFF\uDFFF"  # a UTF-16 surrogate pair range: U+10000..U+10FFFF
_NUMBERS = ("integer", "long", "float", "double")


def install(events: Any, services: tuple[str, ...] = SERVICES) -> None:
    """Check every request of `services` sent through clients made from `events` (a boto3 or botocore session's
    event system) before it is built; a request the service would refuse raises ClientError ValidationException."""
    for service in services:
        events.register(f"before-parameter-build.{service}", _refuse_invalid)


def _refuse_invalid(params: dict, model: Any, **_: Any) -> None:
    problems = list(violations(model.input_shape, params))
    if problems:
        count = len(problems)
        message = f"{count} validation error{'s' if count > 1 else ''} detected: " + "; ".join(problems)
        raise ClientError({"Error": {"Code": "ValidationException", "Message": message},
                           "ResponseMetadata": {"HTTPStatusCode": 400}}, model.name)


def violations(shape: Any, value: Any, path: str = "") -> Iterator[str]:
    """Each way `value` breaks `shape`'s rules, as the service words it. Wrong types are left to botocore."""
    if shape is None or value is None:
        return
    kind = shape.type_name
    rules = shape.metadata
    if kind == "structure":
        if not isinstance(value, dict) or shape.is_document_type:
            return
        for name in shape.required_members:
            if value.get(name) is None:
                yield _problem(None, _join(path, name), "Member must not be null")
        for name, member in shape.members.items():
            if name in value:
                yield from violations(member, value[name], _join(path, name))
    elif kind == "list":
        if not isinstance(value, (list, tuple)):
            return
        yield from _size(value, len(value), rules, path, "length")
        for index, item in enumerate(value, start=1):
            yield from violations(shape.member, item, f"{path}.{index}.member")
    elif kind == "map":
        if not isinstance(value, dict):
            return
        yield from _size(value, len(value), rules, path, "length")
        for key, item in value.items():
            entry = f"{path}.{key}"
            yield from (f"{p} (a map key)" for p in violations(shape.key, key, entry))
            yield from violations(shape.value, item, entry)
    elif kind == "string":
        if not isinstance(value, str):
            return
        yield from _size(value, len(value), rules, path, "length")
        if shape.enum and value not in shape.enum:
            yield _problem(value, path, f"Member must satisfy enum value set: [{', '.join(shape.enum)}]")
        pattern = rules.get("pattern")
        if pattern is not None and not _full_match(pattern, value):
            yield _problem(value, path, f"Member must satisfy regular expression pattern: {pattern}")
    elif kind in _NUMBERS:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield from _size(value, value, rules, path, "value")
    elif kind == "blob":
        if isinstance(value, (bytes, bytearray)):
            yield from _size(value, len(value), rules, path, "length")


def _size(value: Any, measure: float, rules: dict, path: str, what: str) -> Iterator[str]:
    if "min" in rules and measure < rules["min"]:
        yield _problem(value, path, f"Member must have {what} greater than or equal to {rules['min']}")
    if "max" in rules and measure > rules["max"]:
        yield _problem(value, path, f"Member must have {what} less than or equal to {rules['max']}")


def _problem(value: Any, path: str, rule: str) -> str:
    if value is None:
        shown = "null"
    elif isinstance(value, (dict, list, tuple)):
        shown = f"'{value!r:.200}'"
    else:
        shown = f"'{value!s:.200}'"
    return f"Value {shown} at '{path}' failed to satisfy constraint: {rule}"


def _join(path: str, member: str) -> str:
    name = member[:1].lower() + member[1:]
    return f"{path}.{name}" if path else name


def _full_match(pattern: str, value: str) -> bool:
    compiled = _compile(pattern)
    return True if compiled is None else compiled.fullmatch(value) is not None


@functools.cache
def _compile(pattern: str) -> Optional[Any]:
    text = pattern.replace(_JAVA_SUPPLEMENTARY_RANGE, r"\U00010000-\U0010FFFF")
    try:
        return re.compile(text)
    except re.error:
        if _unicode_regex is None:
            return None
        return _unicode_regex.compile(text)
