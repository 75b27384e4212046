"""The usage report: what a run hit, missed, recorded, and which recordings it never used.

`llmproxy prune --report FILE` trusts a report only when the run had no misses left
unrecorded: a run that missed may have skipped code paths, so "unused" would not mean "stale";
a miss that `record --missing` recorded ran its code path like a hit.
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
    mode: str, outcome: Outcome, recordings: Path | str, recorded: list[Path], unused: list[Path] | None
) -> dict[str, Any]:
    return {
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
            f"the run had {len(misses)} miss(es) (first: {misses[0].get('method')} {misses[0].get('path')}); "
            "a run with misses may not have exercised everything, so nothing is pruned"
        )
    if report.get("unused") is None:
        raise ReportError(
            f"a {report.get('mode')} run does not load recordings; use a replay or record --missing report"
        )
    return [Path(name) for name in report["unused"]]
