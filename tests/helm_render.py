"""Render the Helm chart charts/cropi with real Helm (helm-python-sdk), offline: no cluster is
reached, so `lookup` finds no live Secret and the chart generates fresh ones.

    from tests.helm_render import render_chart
    objects = render_chart({"ray": {"rolloutService": {"enabled": True}}})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from helm_python import Chart

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "cropi"
# The chart's presets: values files next to values.yaml (None: the defaults alone).
PRESET_FILES: dict[str, str | None] = {"default": None, "7b": "values-7b.yaml", "gpu-small": "values-gpu-small.yaml",
                                       "external": "values-external.yaml"}


def preset_values(name: str) -> dict[str, Any]:
    """The values of preset `name` (a key of PRESET_FILES), as given to `helm install -f`."""
    file = PRESET_FILES[name]
    return yaml.safe_load((CHART / file).read_text()) if file else {}


def render_chart(values: dict | None = None, name: str = "demo", namespace: str = "ml") -> list[dict]:
    """The Kubernetes objects `helm template` would print for release `name` in `namespace`.

    Raises helm_python.errors.HelmError when Helm refuses the values (schema) or a template fails.
    """
    with Chart.load(CHART) as chart:
        manifests = chart.render(values=values or {}, name=name, namespace=namespace)
    return [doc for path, text in manifests.items() if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]
