"""gradlens.report."""
