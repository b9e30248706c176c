"""gradlens: see what the gradients of a language model are doing while it trains."""

from gradlens.roles import LayerInfo, Role, discover_layers

__version__ = "0.1.0"

__all__ = ["LayerInfo", "Role", "__version__", "discover_layers"]
