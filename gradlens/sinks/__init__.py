"""gradlens.sinks."""
