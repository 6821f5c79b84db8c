"""Model names to backends: a request's `model` is a local model's id, `provider/model` of a
remote provider (or the provider's bare name, meaning its default model), a named route of the
providers file, or 'templates'. Remote names answer through a one-link chain, so every remote
call gets the same cooldown, metrics and error reporting as a route's."""

from __future__ import annotations

from semilla.serve.backends.base import Backend
from semilla.serve.backends.chain import Breaker, FallbackChain, TemplateBackend
from semilla.serve.backends.local import LocalBackend
from semilla.serve.backends.remote import BACKENDS, RemoteBackend, Upstream
from semilla.serve.backends.split import SplitRoute
from semilla.serve.errors import APIError
from semilla.serve.providers import TEMPLATES, ProvidersFile


class ModelRouter:
    """Resolves model names; `configure` swaps the providers file's part at run time."""

    def __init__(self, local: dict[str, LocalBackend], file: ProvidersFile | None = None):
        self.local = local  # the server's own dict: loads and unloads are seen at once
        self.redis = None  # accounts.shared.RedisLink: cooldowns shared by every replica
        self.upstreams: dict[str, Upstream] = {}
        self.configure(file or ProvidersFile())

    def configure(self, file: ProvidersFile) -> list[Upstream]:
        """Use `file`'s providers, routes, templates and cooldown from now on; returns the
        upstreams it replaces (their connection pools are the caller's to close)."""
        replaced = list(self.upstreams.values())
        self.file = file
        self.upstreams = {name: Upstream(cfg) for name, cfg in file.providers.items() if cfg.remote}
        self.breakers: dict[str, Breaker] = {}
        self.remote: dict[str, RemoteBackend] = {}
        self.direct: dict[str, FallbackChain] = {}
        self.templates = TemplateBackend(file.templates.answer) if file.templates.enabled else None
        self.routes: dict[str, Backend] = {
            name: FallbackChain(name, links, self.link, self.breaker) for name, links in file.routes.items()
        }
        for name, weights in file.splits.items():  # A/B routes: a variant may be a model or a route
            self.routes[name] = SplitRoute(name, weights, self.backend, self.breaker)
        self.default = file.default
        return replaced

    def breaker(self, label: str) -> Breaker:
        if label not in self.breakers:
            if self.redis is None:
                self.breakers[label] = Breaker(self.file.cooldown)
            else:
                from semilla.serve.backends.cooldowns import SharedBreaker

                self.breakers[label] = SharedBreaker(self.redis, label, self.file.cooldown)
        return self.breakers[label]

    def link(self, name: str) -> Backend:
        """What one link of a chain names (never a route): a local model, a remote model, templates."""
        if name in self.local:
            return self.local[name]
        if name == TEMPLATES and self.templates is not None:
            return self.templates
        provider, slash, model = name.partition("/")
        upstream = self.upstreams.get(provider)
        if upstream is not None:
            model = model if slash else upstream.cfg.model
            if model:
                key = f"{provider}/{model}"
                if key not in self.remote:
                    self.remote[key] = BACKENDS[upstream.cfg.kind](upstream, model)
                return self.remote[key]
        raise APIError(
            404, f"model {name!r} does not exist (served: {', '.join(self.names()) or 'none'})",
            param="model", code="model_not_found",
        )  # fmt: skip

    def backend(self, name: str | None) -> Backend:
        """The backend a request's model names; with no name, the default (else the first local model)."""
        if not name:
            name = self.default or next(iter(self.local), "")
            if not name:
                raise APIError(503, "no model is loaded yet", code="model_not_ready")
        if name in self.local:
            return self.local[name]
        if name in self.routes:
            return self.routes[name]
        self.link(name)  # 404 for a name nothing answers
        if name not in self.direct:
            self.direct[name] = FallbackChain(name, [name], self.link, self.breaker)
        return self.direct[name]

    def splits(self) -> dict[str, SplitRoute]:
        """The A/B routes, by name."""
        return {name: r for name, r in self.routes.items() if isinstance(r, SplitRoute)}

    def promote(self, route: str, variant: str) -> SplitRoute:
        """Send all of an A/B route's traffic to `variant` from now on (until the providers file
        is reloaded): the test is over and it won."""
        split = self.splits().get(route)
        if split is None:
            raise APIError(404, f"no A/B route {route!r} (A/B routes: {', '.join(self.splits()) or 'none'})",
                           param="route", code="route_not_found")  # fmt: skip
        if variant not in split.weights:
            raise APIError(400, f"{variant!r} is not a variant of {route!r} ({', '.join(split.weights)})",
                           param="variant")  # fmt: skip
        split.keep_only(variant)
        return split

    def names(self) -> list[str]:
        return [*self.local, *self.routes, *self.remote_names()]

    def remote_names(self) -> list[str]:
        names = []
        for name, upstream in self.upstreams.items():
            models = ([upstream.cfg.model] if upstream.cfg.model else []) + upstream.cfg.models
            names += [f"{name}/{m}" for m in dict.fromkeys(models)]
        return names

    def cards(self, admin: bool = False) -> list[dict]:
        """/v1/models: local models, routes, and the remote models the file lists (no URL, no key)."""
        cards = [b.card(admin) for b in list(self.local.values())]  # a copy: loads happen in threads
        cards += [r.card(admin) for r in self.routes.values()]
        cards += [self.link(name).card(admin) for name in self.remote_names()]
        return cards

    def provider_states(self) -> list[dict]:
        """For admins: each provider's kind, URL, models and cooldown state (never its key)."""
        out = []
        for name, cfg in self.file.providers.items():
            entry = {"name": name, "kind": cfg.kind, "model": cfg.model or None, "models": cfg.models}
            if cfg.remote:
                entry["base_url"] = cfg.base_url
            out.append(entry | self.breaker(name).state())
        return out
