"""Command-line tools that are not part of the main pipeline (e.g. training the test-bed models)."""
