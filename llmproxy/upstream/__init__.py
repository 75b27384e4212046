"""The upstream side: the HTTP client that forwards calls, and single-flight of identical calls."""
