"""CPU to prepare one big recording (`Recorder.prepare`), by stage, without a network.

    python -m bench.prepare              # both cases, 15 runs each
    python -m bench.prepare --runs 31 --case sse5000

Builds the exchange `llmproxy record` hands the recorder for the benchmark's two big cases
(bench/common.py's bytes: a 5,000-chunk OpenAI chat stream read in batches of 50 events, and
a 1 MB JSON body), then times `Recorder.prepare` and its stages: capture (the codec),
chunk_times, build_recording (capture and chunk_times included), to_document, serialize and
the secret scan. Numbers are CPU time (time.process_time), the median (and least) of the runs:
steady on a loaded machine where wall time is not. The request carries an OpenAI key, as SDK
calls do, so the scan searches for it too.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import Spec, expected_bytes, sse_events
from llmproxy.call import Call, Outcome
from llmproxy.canonical import parse_body
from llmproxy.routing import Router, default_routes
from llmproxy.store.directory import RecordingStore
from llmproxy.store.document import to_document
from llmproxy.store.index import canonical_for_route
from llmproxy.store.writer import Recorder, _build, _compact_pieces, build_recording, capture_response, chunk_times
from llmproxy.upstream.client import Exchange
from llmproxy.wire.registry import codec_for_content_type

CASES = {
    "sse5000": Spec("sse", chunks=5000),
    "json1mb": Spec("json", size=1_000_000),
    "sse100": Spec("sse", chunks=100),
    "json": Spec("json"),
}
KEY = "sk-proj-benchBENCHbench0123456789abcdef"


def exchange_for(spec: Spec, salt: str = "prepare") -> Exchange:
    """The exchange the pipeline builds for one call of the bench client to the bench upstream."""
    body = spec.request_body(salt)
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
    match = Router(default_routes()).resolve("POST", "/v1/chat/completions", headers)
    assert match is not None
    body_value = parse_body(body, headers["content-type"])
    canonical = canonical_for_route(match.route, "POST", match.path, [], headers, body_value)
    call = Call(match.route, "POST", match.path, "", [], headers, body, body_value, canonical)
    if spec.kind == "sse":
        # The bench upstream writes 50 events per write; one read each, 0.2 ms apart.
        events = sse_events(spec, salt)
        raw, reads, received = b"", [], 0
        for start in range(0, len(events), 50):
            batch = b"".join(events[start : start + 50])
            raw += batch
            received += len(batch)
            reads.append((received, 1.0 + 0.2 * len(reads)))
        content_type = "text/event-stream; charset=utf-8"
    else:
        raw = expected_bytes(spec, salt)
        reads = [(len(raw), 2.0)]
        content_type = "application/json; charset=utf-8"
    assert raw == expected_bytes(spec, salt)
    return Exchange(
        call=call,
        url="http://127.0.0.1:9001/v1/chat/completions",
        status=200,
        headers=[("Content-Type", content_type), ("Content-Length", str(len(raw)))],
        body=raw,
        reads=reads,
        headers_ms=0.5,
    )


def cpu_ms(work: Callable[[], Any], runs: int) -> tuple[float, float]:
    """Median CPU milliseconds of `work` over `runs` runs, after one warm-up (collector off while
    timing; what it returns is freed after the clock stops)."""
    times = []
    for run in range(runs + 1):
        gc.collect()
        gc.disable()
        try:
            start = time.process_time()
            result = work()
            spent = time.process_time() - start
        finally:
            gc.enable()
        del result
        if run:
            times.append(spent * 1000)
    return statistics.median(times), min(times)


def measure(name: str, spec: Spec, runs: int) -> None:
    exchange = exchange_for(spec)
    with tempfile.TemporaryDirectory() as root:
        recorder = Recorder(RecordingStore(Path(root)), Outcome())
        prepared = recorder.prepare(exchange)
        assert prepared is not None, "not recorded: see the log"
        call = exchange.call
        provider = call.route.provider
        codec = codec_for_content_type(dict(exchange.headers)["Content-Type"])
        recording, captured, _ = _build(exchange)
        document = to_document(recording)
        data = recorder.store.serialize(document)
        values = call.credentials()
        pieces = _compact_pieces(document, captured)  # the quick pass's compact JSON, as prepare has it
        stages = {
            "capture": lambda: capture_response(provider, call.path, codec, exchange.body),
            "chunk_times": lambda: chunk_times(exchange.reads, captured.chunk_ends) if captured.chunk_ends else None,
            "build (all)": lambda: build_recording(exchange),
            "document": lambda: to_document(recording),
            "serialize": lambda: recorder.store.serialize(document),
            "scan": lambda: recorder.scanner.scan(document, data, values, pieces),
            "prepare": lambda: recorder.prepare(exchange),
        }
        print(f"{name}: body {len(exchange.body):,} bytes, recording {len(prepared.data):,} bytes, {runs} runs")
        for stage, work in stages.items():
            median, least = cpu_ms(work, runs)
            print(f"  {stage:<12} {median:8.2f} ms CPU (min {least:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    args = parser.parse_args()
    for name in args.case or list(CASES):
        measure(name, CASES[name], args.runs)


if __name__ == "__main__":
    main()
