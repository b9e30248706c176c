"""gradlens.core."""
