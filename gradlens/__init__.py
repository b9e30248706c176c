"""gradlens: see what the gradients of a language model are doing while it trains."""

from gradlens.core.lens import GradLens
from gradlens.optim import SCALE, scale_param_groups
from gradlens.roles import LayerInfo, Role, discover_layers

__version__ = "0.1.0"

__all__ = ["SCALE", "GradLens", "LayerInfo", "Role", "__version__", "discover_layers", "scale_param_groups"]
