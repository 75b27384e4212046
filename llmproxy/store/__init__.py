"""Recordings at rest: the document format, the directory store, the index, the writer, the secret scanner."""
