"""``KEY=VALUE`` options of a task argument, comma-separated as on the command line
(``--tasks vindr:agg=any,labels=all,rsna``, ``demo:n_patients=50,size=128``): one parser, one error wording."""
from __future__ import annotations

from typing import Any, Callable, Collection, Mapping, Union

#: What a key accepts: None (any text, e.g. a path), a collection of permitted texts, or a converter such as `int`
#: or `float` (its ValueError means the text is not valid for the key).
OptionSpec = Union[None, Collection[str], Callable[[str], Any]]


def _shape(spec: OptionSpec) -> str:
    if spec is None:
        return "value"
    if callable(spec):
        return getattr(spec, "__name__", "value")
    return "|".join(spec)


def parse_options(owner: str, arg: str | None, allowed: Mapping[str, OptionSpec],
                  error: type[ValueError] = ValueError) -> dict[str, Any]:
    """The options in `arg` (None or empty: none), checked against `allowed` and converted by its converters.
    `owner` names the task in messages; a bad option raises `error` (a ValueError subclass, e.g. the caller's
    TaskError) naming the task, the key and what it accepts. Empty pieces (``a=1,,b=2``) are ignored."""
    options: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in (arg or "").split(","))):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in allowed:
            known = ", ".join(f"{k}=<{_shape(v)}>" for k, v in allowed.items())
            raise error(f"task {owner!r}: unknown option {part!r}; "
                        + (f"options are {known}" if known else "it takes no options"))
        spec = allowed[key]
        if spec is None:
            options[key] = value
        elif callable(spec):
            try:
                options[key] = spec(value)
            except ValueError:
                raise error(f"task {owner!r}: {key}={value!r} is not a valid {_shape(spec)}") from None
        elif value in spec:
            options[key] = value
        else:
            raise error(f"task {owner!r}: {key}={value!r} is not one of {list(spec)}")
    return options
