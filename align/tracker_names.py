"""The trackers `trainer.report_to` may name, and the start-up check that each is installed.

Kept apart from `align.trackers` (which writes to them and reads `TrackingConfig`) so that
`align.config` can validate `report_to` without importing anything that imports it back.
"""

from __future__ import annotations

import importlib.util

from align.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
# The package each tracker needs, and what to install for it.
PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"),
            "wandb": ("wandb", "pip install wandb"), "mlflow": ("mlflow", "pip install mlflow")}


def check_trackers(names: list[str]) -> None:
    """Refuse unknown tracker names and trackers whose package is missing (key named).

    Raises:
        ConfigError: a name is not one of TRACKERS, or its package cannot be imported.
    """
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"trainer.report_to: unknown tracker {name!r}; choose from "
                              f"{', '.join(TRACKERS)}")
        module, install = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"trainer.report_to lists {name!r} but the {module} package is "
                              f"not installed; run `{install}` or remove it from the list")
