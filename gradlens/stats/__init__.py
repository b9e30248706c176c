"""gradlens.stats."""
