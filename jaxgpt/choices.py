"""The check for a setting that must name one of a fixed set of choices, so every config
group (model, data, optim, mesh, train, sampling) words that error the same way. A leaf
module: it imports nothing from jaxgpt, so any module can use it."""


def check(field: str, value, choices) -> None:
    """ValueError naming `field`, the allowed `choices` and the offending `value`."""
    if value not in choices:
        raise ValueError(f"{field} must be one of {'|'.join(choices)}, got {value!r}")
