"""gradlens.integrations."""
