"""Routing: which route (name, provider, upstream) an incoming request belongs to.

The same Router object serves record and replay, and also tells the index which route a
stored recording belongs to, so a file replays through the route that recorded it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from llmproxy.providers import Provider, get_provider


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    provider: Provider
    upstream: str | None = None
    # A path prefix that selects this route and is stripped before forwarding ("/anthropic").
    prefix: str | None = None
    # Request headers whose values join the request key (e.g. anthropic-version), lower case.
    key_headers: tuple[str, ...] = ()
    # Body fields (JSON paths) and query parameters left out of the key.
    ignore_body: tuple[str, ...] = ()
    ignore_query: tuple[str, ...] = ()
    # Floats in the body are rounded to this many decimals before keying (None: exact).
    round_floats: int | None = None

    def upstream_url(self, path: str, query_string: str = "") -> str:
        if not self.upstream:
            raise LookupError(f"route {self.name!r} has no upstream configured")
        base = self.upstream.rstrip("/")
        base_path = urlsplit(base).path
        # An upstream given as "https://host/v1" and a client path "/v1/x" mean "/v1/x", not
        # "/v1/v1/x" (the bug visible in the seed recording's url).
        if base_path and (path == base_path or path.startswith(base_path + "/")):
            base = base[: len(base) - len(base_path)]
        url = base + path
        return f"{url}?{query_string}" if query_string else url


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: Route
    # The path as the upstream sees it (the route's prefix removed).
    path: str


class Router:
    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = list(routes)
        names = [route.name for route in self.routes]
        duplicates = {name for name in names if names.count(name) > 1}
        if duplicates:
            raise ValueError(f"route names must be unique: {', '.join(sorted(duplicates))}")
        self._by_name = {route.name: route for route in self.routes}
        self._prefixed = sorted(
            (route for route in self.routes if route.prefix),
            key=lambda route: len(route.prefix or ""),
            reverse=True,
        )
        # Routes chosen by their provider's path rules; stable sort keeps config order on ties.
        self._by_rule = sorted(
            (route for route in self.routes if not route.prefix),
            key=lambda route: route.provider.claim_priority,
            reverse=True,
        )

    def get(self, name: str) -> Route | None:
        return self._by_name.get(name)

    def resolve(self, method: str, path: str, headers: Mapping[str, str]) -> RouteMatch | None:
        for route in self._prefixed:
            prefix = route.prefix or ""
            if path == prefix or path.startswith(prefix + "/"):
                return RouteMatch(route, path[len(prefix) :] or "/")
        for route in self._by_rule:
            if route.provider.claims(method, path, headers):
                return RouteMatch(route, path)
        return None


def default_routes(openai_upstream: str | None = None) -> list[Route]:
    """One route per provider that has a public default upstream; Azure needs a config entry."""
    routes = []
    for name in ("openai", "anthropic", "ollama", "gemini"):
        provider = get_provider(name)
        upstream = openai_upstream if name == "openai" and openai_upstream else provider.default_upstream
        routes.append(Route(name=name, provider=provider, upstream=upstream))
    return routes
