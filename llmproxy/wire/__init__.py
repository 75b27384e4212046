"""Stream and body codecs by wire format (split, capture, render), one module each; the
registry (`llmproxy.wire.registry`) finds them by media type or recorded format."""
