"""The names of the threshold policies and the defaults, without the code that applies them:
command-line help needs the names, and must not import scikit-learn to show them."""

from __future__ import annotations

# The seed's deployment table: first screening, final inspection, safety-critical parts.
PRESETS = {
    "screening": "target_recall:0.95",
    "final": "target_precision:0.90",
    "critical": "target_recall:0.99",
}
POLICY_HELP = (
    "youden, max_f1, target_recall:R, target_precision:P, normal_quantile:Q, contamination:PCT, "
    f"or a preset ({', '.join(f'{k} = {v}' for k, v in PRESETS.items())})"
)
DEFAULT_LABELLED_POLICY = "youden"
DEFAULT_UNLABELLED_POLICY = "normal_quantile:0.99"
