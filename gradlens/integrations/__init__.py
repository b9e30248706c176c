"""Thin adapters that attach a GradLens to training frameworks (imported lazily)."""
