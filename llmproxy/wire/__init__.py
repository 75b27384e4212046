"""Stream and body codecs by wire format: split, capture, render."""
