"""Routing: which route (name, provider, upstream) an incoming request belongs to, and whether
it may go there at all.

A request reaches a route in one of three ways, tried in this order:
1. a configured route's `prefix` ("/local/..."), stripped before forwarding (and the SDK's
   base-URL convention undone as under 3: "/local/chat/completions" is "/v1/chat/completions");
2. an unprefixed path one provider claims as its own API's (legacy base URLs: /v1/chat/completions,
   /v1/messages, /api/chat, /v1beta/models/...). No provider claims every path;
3. a provider's built-in prefix (/openai, /anthropic, /ollama, /gemini, /azure, one per registered
   provider), which selects that provider's route whatever follows it: /anthropic/v1/messages and
   /anthropic/messages (the Vercel AI SDK's shape) both reach Anthropic's /v1/messages.
Anything else is a 404 `no_route` naming the base URLs that exist. A request whose credential or
identity headers belong to another provider than its route's is refused (400) before anything
is sent upstream.

The same Router object serves record and replay, and also tells the index which route a
stored recording belongs to, so a file replays through the route that recorded it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from llmproxy.providers import CREDENTIAL_HEADERS, CREDENTIAL_QUERY, IDENTITY_HEADERS, PROVIDERS, Provider

# Headers that say which provider a request is for: credentials and provider-only headers.
_TELLING_HEADERS = CREDENTIAL_HEADERS | IDENTITY_HEADERS

# Resolutions kept per router: (method, path, claim header values) -> match. Paths with ids in
# them are unbounded, so the memo starts again when full.
MAX_RESOLVED = 1024
_UNRESOLVED = object()


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
    # The path as the upstream sees it (the prefix removed, the SDK's base-URL convention undone).
    path: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request llmproxy answers itself, sending nothing upstream."""

    status: int
    code: str  # "no_route" or "credential_mismatch"
    message: str
    # The route whose provider's error shape the answer takes (None: the generic shape).
    route: Route | None = None


def _under(path: str, prefix: str) -> str | None:
    """The rest of `path` below `prefix` ("/" for the prefix itself), or None if not under it."""
    if path == prefix or path.startswith(prefix + "/"):
        return path[len(prefix) :] or "/"
    return None


class Router:
    def __init__(self, routes: Iterable[Route]) -> None:
        configured = list(routes)
        names = [route.name for route in configured]
        duplicates = {name for name in names if names.count(name) > 1}
        if duplicates:
            raise ValueError(f"route names must be unique: {', '.join(sorted(duplicates))}")
        # Every registered provider has a route, so its prefix always works: a built-in one
        # (named after it, default upstream) for each provider the configuration leaves out.
        configured_providers = {route.provider.name for route in configured}
        builtins = [
            Route(name=provider.name, provider=provider, upstream=provider.default_upstream)
            for provider in PROVIDERS.values()
            if provider.name not in configured_providers and provider.name not in names
        ]
        self.routes = configured + builtins
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
        # Provider prefix -> the provider's route: its first without a configured prefix, else its first.
        by_provider: dict[str, Route] = {}
        for route in [*self._by_rule, *self.routes]:
            by_provider.setdefault(route.provider.name, route)
        self._by_provider_prefix = sorted(
            ((route.provider.prefix, route) for route in by_provider.values()),
            key=lambda item: len(item[0]),
            reverse=True,
        )
        # A resolution depends on the method, the path and these headers only (each provider
        # declares what its path rules read), so it is computed once per distinct triple: an
        # unprefixed path would otherwise ask every provider's `claims` on every request.
        self._claim_headers = tuple(sorted({name for route in self.routes for name in route.provider.claim_headers}))
        self._resolved: dict[tuple[str | None, ...], RouteMatch | None] = {}

    def get(self, name: str) -> Route | None:
        return self._by_name.get(name)

    def resolve(self, method: str, path: str, headers: Mapping[str, str]) -> RouteMatch | None:
        """The route a request path belongs to, and the path its upstream sees (see module doc).
        `headers` have lower-case names (or are case-insensitive)."""
        key = (method, path, *[headers.get(name) for name in self._claim_headers])
        found = self._resolved.get(key, _UNRESOLVED)
        if found is _UNRESOLVED:
            shown = {name: value for name, value in zip(self._claim_headers, key[2:]) if value is not None}
            found = self._resolve(method, path, shown)
            if len(self._resolved) >= MAX_RESOLVED:
                self._resolved.clear()
            self._resolved[key] = found
        return found  # type: ignore[return-value]

    def _resolve(self, method: str, path: str, headers: Mapping[str, str]) -> RouteMatch | None:
        for route in self._prefixed:
            rest = _under(path, route.prefix or "")
            if rest is not None:
                return RouteMatch(route, route.provider.upstream_path(method, rest, headers))
        for route in self._by_rule:
            if route.provider.claims(method, path, headers):
                return RouteMatch(route, path)
        for prefix, route in self._by_provider_prefix:
            rest = _under(path, prefix)
            if rest is not None:
                return RouteMatch(route, route.provider.upstream_path(method, rest, headers))
        return None

    def route(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        query_string: str = "",
        host: str = "",
        *,
        lowered: bool = False,
    ) -> RouteMatch | Refusal:
        """Resolve an incoming request, refusing one no route serves (404) and one whose
        credentials belong to another provider than the route's (400). `lowered`: the caller's
        `headers` already have lower-case names (spares a copy)."""
        if not lowered:
            headers = {name.lower(): value for name, value in headers.items()}
        match = self.resolve(method, path, headers)
        if match is None:
            return Refusal(
                404,
                "no_route",
                f"no route for {method} {path}. Use a provider's base URL: {self.describe_base_urls(host)}",
                self._route_telling(headers),
            )
        mismatch = credential_mismatch(match.route.provider, headers, query_string)
        if mismatch is None:
            return match
        return Refusal(
            400,
            "credential_mismatch",
            f"{mismatch}: route {match.route.name!r} forwards {method} {path} to {match.route.provider.name}, "
            f"so nothing was sent. Use a provider's base URL: {self.describe_base_urls(host)}",
            # In the shape of the client's own provider, whose SDK then shows the message.
            self._route_telling(headers) or match.route,
        )

    def describe_base_urls(self, host: str = "") -> str:
        """The prefixed base URLs, for error messages: "openai http://host/openai, ..."."""
        base = f"http://{host}" if host else ""
        urls = [f"{route.name} {base}{route.prefix}" for route in self._prefixed]
        urls += [f"{route.name} {base}{prefix}" for prefix, route in self._by_provider_prefix]
        return ", ".join(sorted(urls, key=lambda text: text.split()[1]))

    def _route_telling(self, headers: Mapping[str, str]) -> Route | None:
        """The route of the one provider a request's own headers point at, for the error shape."""
        owners = {
            provider.name
            for name in headers
            if name in IDENTITY_HEADERS or (name in CREDENTIAL_HEADERS and name != "authorization")
            for provider in PROVIDERS.values()
            if provider.accepts_header(name, headers)
        }
        if len(owners) != 1:
            return None
        (owner,) = owners
        return next((route for prefix, route in self._by_provider_prefix if route.provider.name == owner), None)


def credential_mismatch(provider: Provider, headers: Mapping[str, str], query_string: str = "") -> str | None:
    """Why a request must not reach `provider`'s upstream: the credential or identity headers
    (or credential query parameters) it carries that belong to other providers only. `headers`
    have lower-case names."""
    foreign: list[str] = []
    # The usual request carries one or two telling headers, all the route's: found in C, not
    # by a walk over every header; the walk (in the client's order) only when one is foreign.
    telling = _TELLING_HEADERS.intersection(headers)
    if telling and not all(provider.accepts_header(name, headers) for name in telling):
        foreign = [name for name in headers if name in _TELLING_HEADERS and not provider.accepts_header(name, headers)]
    if query_string and CREDENTIAL_QUERY:
        names = {name.lower() for name, _ in parse_qsl(query_string, keep_blank_values=True)}
        foreign += [f"?{name}" for name in sorted(names & CREDENTIAL_QUERY) if not provider.accepts_query(name)]
    if not foreign:
        return None
    parts = []
    for name in foreign:
        bare = name.lstrip("?")
        owners = [
            other.name
            for other in PROVIDERS.values()
            if (other.accepts_query(bare) if name.startswith("?") else other.accepts_header(bare, headers))
        ]
        parts.append(f"{name} (used by {', '.join(owners) or 'another provider'})")
    return f"the request carries {'; '.join(parts)}, which {provider.name} does not take"


def default_routes(openai_upstream: str | None = None) -> list[Route]:
    """One route per registered provider, with its default upstream (Azure's must be configured)."""
    routes = []
    for provider in PROVIDERS.values():
        upstream = openai_upstream if provider.name == "openai" and openai_upstream else provider.default_upstream
        routes.append(Route(name=provider.name, provider=provider, upstream=upstream))
    return routes
