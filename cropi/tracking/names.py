"""What the trackers share: scalar names, the extra to install, a spec as flat params.

Scalar names: `<kind>/<field>`, an eval record's `eval/<set>/<field>`, a
nested mapping's `<kind>/<field>/<key>` (a selection's `mix`). Booleans,
strings and lists (`samples`) are not scalars.
"""

from __future__ import annotations

from typing import Any

EXTRA = "pip install 'cropi[tracking]'"


def scalars(kind: str, values: dict[str, Any]) -> dict[str, float]:
    """A record's numbers under their tracker names (see the module's docstring)."""
    prefix = f"{kind}/{values['set']}" if kind == "eval" and "set" in values else kind
    out: dict[str, float] = {}

    def add(name: str, value: Any) -> None:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, dict):
            for key, inner in value.items():
                add(f"{name}/{key}", inner)

    for key, value in values.items():
        if key not in ("set", "stage") or kind == "selection":
            add(f"{prefix}/{key}", value)
    return out


def flat_config(data: Any, prefix: str = "") -> dict[str, str]:
    """A spec as flat `a.b.c -> value` strings (MLflow params)."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flat_config(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: str(data)[:500]}
