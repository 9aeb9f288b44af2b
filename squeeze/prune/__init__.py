"""Structural channel pruning: coupling analysis, importance criteria, plans and their application.

Importing this package registers the "channels" plan kind, so squeeze checkpoints that record a
channel plan replay it when loaded.
"""

from squeeze.prune.engine import (
    apply_plan,
    make_plan,
    select_channels,
    target_widths,
    uniform_plan,
)
from squeeze.prune.graph import (
    LayerSpec,
    LayerTable,
    PrunableLayer,
    SkippedLayer,
    prunable_layers,
)
from squeeze.prune.importance import (
    Criterion,
    get_importance,
    list_importances,
    register_importance,
)
from squeeze.prune.plan import (
    PLAN_KIND,
    ChannelPlan,
    PlanError,
    PruneError,
    check_plan,
    compose_plans,
    plan_from_json,
    plan_to_json,
    round_width,
)

__all__ = [
    "PLAN_KIND",
    "ChannelPlan",
    "Criterion",
    "LayerSpec",
    "LayerTable",
    "PlanError",
    "PrunableLayer",
    "PruneError",
    "SkippedLayer",
    "apply_plan",
    "check_plan",
    "compose_plans",
    "get_importance",
    "list_importances",
    "make_plan",
    "plan_from_json",
    "plan_to_json",
    "prunable_layers",
    "register_importance",
    "round_width",
    "select_channels",
    "target_widths",
    "uniform_plan",
]
