"""gradlens.optim."""
