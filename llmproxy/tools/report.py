"""The usage report: what a run hit, missed, recorded, and which recordings it never used.

`llmproxy prune --report FILE` trusts a report only when the run had no misses left
unrecorded: a run that missed may have skipped code paths, so "unused" would not mean "stale";
a miss that `record --missing` recorded ran its code path like a hit.

Each miss names its `scope`: the test (pytest node id) or x-llmproxy-scope it came from, or null.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from llmproxy import __version__
from llmproxy.call import Outcome
from llmproxy.errors import LlmproxyError

REPORT_KIND = "llmproxy-usage-report"


def build_report(
    mode: str,
    outcome: Outcome,
    recordings: Path | str,
    recorded: list[Path],
    unused: list[Path] | None,
    saved: dict[str, Any] | None = None,
) -> dict[str, Any]:
    report = {
        "kind": REPORT_KIND,
        "version": __version__,
        "mode": mode,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "recordings": str(recordings),
        "hits": outcome.hits,
        # Misses nothing answers yet; those record --missing recorded are listed apart.
        "misses": outcome.unrecorded_misses,
        "recorded_misses": outcome.recorded_misses,
        "recorded": [str(path) for path in recorded],
        # None when the mode loaded no recordings (plain record): nothing can be said of use.
        "unused": None if unused is None else sorted({str(path) for path in unused}),
        "errors": outcome.errors,
        "refused": outcome.refused,
        "not_recorded": outcome.not_recorded,
        "not_recorded_by": dict(outcome.not_recorded_by),
        # Tokens and cost the replayed answers would have cost upstream (None: nothing replayed).
        "saved": saved,
    }
    _drop_secrets(report["misses"])
    return report


def _drop_secrets(misses: list[dict[str, Any]]) -> None:
    """A missed request's body goes to disk only when the secret scanner finds nothing in it."""
    from llmproxy.store.secrets import SecretScanner

    scanner = SecretScanner()
    for index, miss in enumerate(misses):
        findings = scanner.scan({k: miss.get(k) for k in ("query", "headers", "body")})
        if findings:
            kept = {k: v for k, v in miss.items() if k not in ("query", "headers", "body")}
            misses[index] = kept | {"dropped": f"request left out: {findings[0]}"}


def replay_savings(replayed: list[tuple[Any, int]], provider_for: Any) -> dict[str, Any]:
    """Tokens and cost of the answers a run replayed instead of asking upstream, per replay."""
    from decimal import Decimal

    from llmproxy.tools.explain import recorded_at
    from llmproxy.usage import price
    from llmproxy.wire.framing import data_of

    tokens_in = tokens_out = unknown = 0
    cost = Decimal(0)
    for entry, count in replayed:
        try:
            recording = entry.recording(provider_for)
        except (LlmproxyError, OSError):  # removed or changed since it was replayed: counted unknown
            unknown += count
            continue
        request, response = recording.request, recording.response
        body = response.body
        streamed = response.is_streaming and isinstance(body, list)
        values = [data_of(item) for item in body] if streamed else [data_of(body)]
        usage = entry.route.provider.usage(request.path, values)
        if usage is None:
            unknown += count
            continue
        tokens_in += usage.input_tokens * count
        tokens_out += usage.output_tokens * count
        answered = (recording.provenance or {}).get("response_model")
        model = answered if isinstance(answered, str) and answered else request.model
        priced = price(usage, model, entry.route.provider.name, recorded_at(recording))
        if priced.usd is None:
            unknown += count
        else:
            cost += priced.usd * count
    return {
        "replays": sum(count for _, count in replayed),
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "cost_usd": float(cost),
        # Replays whose tokens or price are unknown: the sum leaves them out rather than guess.
        "unknown": unknown,
    }


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")


class ReportError(LlmproxyError, ValueError):
    """A usage report that cannot be used for pruning; the message says why."""


def read_report(path: Path) -> dict[str, Any]:
    try:
        report = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror}") from None
    except orjson.JSONDecodeError:
        raise ReportError(f"{path} is not JSON") from None
    if not isinstance(report, dict) or report.get("kind") != REPORT_KIND:
        raise ReportError(f"{path} is not an llmproxy usage report")
    return report


def prunable(report: dict[str, Any]) -> list[Path]:
    """The files a report says were never used; refuses reports that cannot say so."""
    misses = report.get("misses") or []
    if misses:
        raise ReportError(
            f"the run had {len(misses)} miss(es) (first: {misses[0].get('method')} {misses[0].get('path')}"
            f"{' in ' + misses[0]['scope'] if misses[0].get('scope') else ''}); "
            "a run with misses may not have exercised everything, so nothing is pruned"
        )
    if report.get("unused") is None:
        raise ReportError(
            f"a {report.get('mode')} run does not load recordings; use a replay or record --missing report"
        )
    return [Path(name) for name in report["unused"]]
