"""The providers file (`semilla serve --providers providers.yaml`): which models answer besides
the checkpoints named on the command line, and in what order when one fails.

    providers:
      local: {kind: semilla, path: runs/demo}               # a checkpoint, served as 'local'
      deepseek:
        kind: openai                                         # any OpenAI-compatible URL
        base_url: https://api.deepseek.com/v1
        api_key_env: DEEPSEEK_API_KEY                        # or api_key_file: /run/secrets/key
        model: deepseek-chat                                 # what 'deepseek' alone means
      claude: {kind: anthropic, api_key_env: ANTHROPIC_API_KEY, model: claude-3-5-haiku-latest}
    routes:
      chain: local -> deepseek -> claude -> templates        # or a list
      ab: {split: {local: 70, deepseek: 30}}                 # an A/B test: weights, sticky per user
    default: chain                                           # the model of requests that name none
    templates: {enabled: true, answer: "Sorry, no model can answer right now."}
    cooldown: {allowed_fails: 3, cooldown_s: 5, window_s: 60}

Keys come only from the environment or secret files, never from this file. Every problem is
reported at once, each with its line (`providers.yaml:7: ...`).

A split's weights are relative: they are divided by their sum (70/30, 0.7/0.3 and 7/3 are the
same test); each must be a number above 0, and a split names two or more distinct variants.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from semilla.errors import CheckpointError, SemillaError

KINDS = ("semilla", "openai", "anthropic")
DEFAULT_URLS = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
TEMPLATES = "templates"
DEFAULT_ANSWER = "No model can answer right now. Please try again in a moment."
TOP_FIELDS = ("providers", "routes", "default", "templates", "cooldown")
PROVIDER_FIELDS = ("kind", "path", "base_url", "api_key_env", "api_key_file", "model", "models",
                   "timeout_s", "connect_timeout_s", "max_connections")  # fmt: skip
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ProvidersFileError(SemillaError):
    """The providers file cannot be used (the message names each problem and its line)."""


class Secret:
    """An API key: shown as *** by repr, str and f-strings; `.value` is the key itself."""

    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass
class ProviderConfig:
    name: str
    kind: str
    path: str = ""  # semilla: the checkpoint (relative paths: from the providers file's folder)
    base_url: str = ""  # openai, anthropic
    api_key_env: str = ""
    api_key_file: str = ""
    api_key: Secret | None = field(default=None, repr=False)
    model: str = ""  # the model the provider's bare name means
    models: list[str] = field(default_factory=list)  # listed in /v1/models as name/model
    timeout_s: float = 60.0  # the longest wait for any read (a hang is a 504 after this)
    connect_timeout_s: float = 5.0
    max_connections: int = 100

    @property
    def remote(self) -> bool:
        return self.kind != "semilla"


@dataclass
class CooldownPolicy:
    """A provider that failed `allowed_fails` times within `window_s` is skipped for `cooldown_s`."""

    allowed_fails: int = 3
    cooldown_s: float = 5.0
    window_s: float = 60.0


@dataclass
class TemplatesConfig:
    """The last resort: a fixed answer, marked as such; off unless enabled."""

    enabled: bool = False
    answer: str = DEFAULT_ANSWER


@dataclass
class ProvidersFile:
    path: str = ""
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    routes: dict[str, list[str]] = field(default_factory=dict)
    splits: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # A/B routes: variant -> share (sums to 1)
    default: str = ""
    templates: TemplatesConfig = field(default_factory=TemplatesConfig)
    cooldown: CooldownPolicy = field(default_factory=CooldownPolicy)

    def checkpoints(self) -> list[tuple[str, str]]:
        """(id, path) of the `semilla` providers: the checkpoints to load."""
        return [(p.name, p.path) for p in self.providers.values() if not p.remote]


def line_numbers(node: yaml.Node, path: tuple = (), lines: dict | None = None) -> dict[tuple, int]:
    """The 1-based line of every key and list item of a composed YAML document, by path."""
    lines = {} if lines is None else lines
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            line_numbers(value, (*path, key.value), lines)
            lines[(*path, key.value)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            line_numbers(item, (*path, i), lines)
    return lines


def route_links(value) -> list[str] | None:
    """A route as a list of names: ['a', 'b'] or DataShark's 'a -> b'."""
    if isinstance(value, str):
        return [part.strip() for part in value.split("->")]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value]
    return None


class _Reader:
    """Collects the problems of one file, each with its line."""

    def __init__(self, path: str, lines: dict[tuple, int]):
        self.path, self.lines, self.problems = path, lines, []

    def problem(self, where: tuple, message: str) -> None:
        while where and where not in self.lines:
            where = where[:-1]
        self.problems.append(f"{self.path}:{self.lines.get(where, 1)}: {message}")

    def number(self, where: tuple, value, low: float, kind=float, strict: bool = False):
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and (kind is float or isinstance(value, int))
        )
        if not ok or value < low or (strict and value == low):
            bound = f"> {low:g}" if strict else f">= {low:g}"
            self.problem(
                where,
                f"{where[-1]} must be a {'number' if kind is float else 'whole number'} {bound}, got {value!r}",
            )
            return None
        return value


def _read_key(reader: _Reader, where: tuple, cfg: ProviderConfig, folder: Path) -> None:
    name = cfg.name
    if cfg.api_key_env:
        value = os.environ.get(cfg.api_key_env, "").strip()
        if not value:
            reader.problem(
                (*where, "api_key_env"),
                f"provider {name!r}: the environment variable {cfg.api_key_env} is not set",
            )
        cfg.api_key = Secret(value)
    elif cfg.api_key_file:
        file = Path(cfg.api_key_file)
        file = file if file.is_absolute() else folder / file
        try:
            value = file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            reader.problem(
                (*where, "api_key_file"),
                f"provider {name!r}: cannot read the key file {file}: {getattr(e, 'strerror', None) or e}",
            )
            return
        if not value:
            reader.problem((*where, "api_key_file"), f"provider {name!r}: the key file {file} is empty")
        cfg.api_key = Secret(value)


def _read_provider(reader: _Reader, name, raw, folder: Path) -> ProviderConfig | None:
    where = ("providers", name)
    if not isinstance(name, str) or not NAME.match(name) or name == TEMPLATES:
        reader.problem(
            where, f"provider name {name!r} must be letters, digits, '.', '_' or '-' (and not {TEMPLATES!r})"
        )
        return None
    if not isinstance(raw, dict):
        reader.problem(where, f"provider {name!r} must be a mapping with a kind")
        return None
    if "api_key" in raw:
        reader.problem(
            (*where, "api_key"),
            f"provider {name!r}: keys are never written in this file; name an environment variable (api_key_env) or a file (api_key_file)",
        )
    for key in raw:
        if key not in PROVIDER_FIELDS and key != "api_key":
            reader.problem(
                (*where, key),
                f"provider {name!r}: unknown field {key!r} (fields: {', '.join(PROVIDER_FIELDS)})",
            )
    kind = raw.get("kind")
    if kind not in KINDS:
        reader.problem(
            (*where, "kind"), f"provider {name!r}: unknown kind {kind!r} (kinds: {', '.join(KINDS)})"
        )
        return None
    cfg = ProviderConfig(name, kind)
    for key in ("path", "base_url", "api_key_env", "api_key_file", "model"):
        value = raw.get(key, "")
        if not isinstance(value, str):
            reader.problem((*where, key), f"provider {name!r}: {key} must be text, got {value!r}")
        else:
            setattr(cfg, key, value.strip())
    models = raw.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        reader.problem((*where, "models"), f"provider {name!r}: models must be a list of model names")
    else:
        cfg.models = list(models)
    for key, low, kind_, strict in (
        ("timeout_s", 0, float, True),
        ("connect_timeout_s", 0, float, True),
        ("max_connections", 1, int, False),
    ):
        if key in raw:
            value = reader.number((*where, key), raw[key], low, kind_, strict)
            if value is not None:
                setattr(cfg, key, value)
    if kind == "semilla":
        _check_checkpoint(reader, where, cfg, folder)
    else:
        _check_remote(reader, where, cfg, folder)
    return cfg


def _check_checkpoint(reader: _Reader, where: tuple, cfg: ProviderConfig, folder: Path) -> None:
    from semilla.checkpoint import resolve_checkpoint

    if not cfg.path:
        reader.problem(where, f"provider {cfg.name!r}: a semilla provider needs the path of a checkpoint")
        return
    path = Path(cfg.path)
    cfg.path = str(path if path.is_absolute() else folder / path)
    try:
        resolve_checkpoint(cfg.path)
    except CheckpointError as e:
        reader.problem((*where, "path"), f"provider {cfg.name!r}: {e}")


def _check_remote(reader: _Reader, where: tuple, cfg: ProviderConfig, folder: Path) -> None:
    cfg.base_url = cfg.base_url or DEFAULT_URLS[cfg.kind]
    url = urlsplit(cfg.base_url)
    if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
        reader.problem(
            (*where, "base_url"),
            f"provider {cfg.name!r}: base_url must be an http(s) URL, got {cfg.base_url!r}",
        )
    _read_key(reader, where, cfg, folder)


def _check_link(reader: _Reader, where: tuple, link: str, file: ProvidersFile, local: set[str]) -> None:
    provider_name, slash, model = link.partition("/")
    provider = file.providers.get(provider_name)
    if link == TEMPLATES:
        if not file.templates.enabled:
            reader.problem(where, "templates is off: set templates: {enabled: true} to use the canned answer")
    elif slash:
        if provider is None or not provider.remote or not model:
            reader.problem(where, f"{link!r} is not PROVIDER/MODEL of a remote provider in this file")
    elif provider is not None and provider.remote:
        if not provider.model:
            reader.problem(
                where, f"provider {link!r} has no default model: write {link}/MODEL or give it model:"
            )
    elif link not in local:
        known = sorted(local | {p.name for p in file.providers.values() if p.remote})
        reader.problem(where, f"{link!r} is no model or provider (known: {', '.join(known) or 'none'})")


def _read_split(reader: _Reader, name: str, value: dict, file: ProvidersFile, local: set[str]) -> None:
    """An A/B route: {split: {variant: weight, ...}}, weights normalised to shares."""
    where = ("routes", name)
    if name in local or name in file.providers or name == TEMPLATES:
        reader.problem(where, f"route name {name!r} must differ from every model and provider")
        return
    split = value.get("split")
    if set(value) != {"split"} or not isinstance(split, dict) or len(split) < 2:
        reader.problem(
            where, f"route {name!r}: an A/B route is {{split: {{MODEL: WEIGHT, MODEL: WEIGHT, ...}}}}"
        )
        return
    weights = {}
    for variant, weight in split.items():
        spot = (*where, "split", variant)
        if not isinstance(variant, str) or not variant:
            reader.problem(spot, f"route {name!r}: a variant must be a model name, got {variant!r}")
            continue
        _check_link(reader, spot, variant, file, local)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            reader.problem(
                spot, f"route {name!r}: the weight of {variant!r} must be a number above 0, got {weight!r}"
            )
            continue
        weights[variant] = float(weight)
    if len(weights) == len(split):
        total = sum(weights.values())
        file.splits[name] = {variant: weight / total for variant, weight in weights.items()}


def load_providers(path: str, local_names: Iterable[str] = ()) -> ProvidersFile:
    """Read and check a providers file; `local_names` are the checkpoints served besides its own.
    Raises ProvidersFileError listing every problem with its line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProvidersFileError(
            f"cannot read the providers file {path}: {getattr(e, 'strerror', None) or e}"
        ) from None
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ProvidersFileError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    reader = _Reader(path, line_numbers(node) if node is not None else {})
    if not isinstance(raw, dict):
        raise ProvidersFileError(f"{path}:1: the providers file must be a mapping (providers:, routes:, ...)")
    for key in raw:
        if key not in TOP_FIELDS:
            reader.problem((key,), f"unknown section {key!r} (sections: {', '.join(TOP_FIELDS)})")
    file = ProvidersFile(path=path)
    folder = Path(path).resolve().parent
    providers = raw.get("providers") or {}
    if not isinstance(providers, dict):
        reader.problem(("providers",), "providers must be a mapping of names to providers")
        providers = {}
    for name, entry in providers.items():
        cfg = _read_provider(reader, name, entry, folder)
        if cfg is not None:
            file.providers[name] = cfg
    local = set(local_names) | {p.name for p in file.providers.values() if not p.remote}
    for name in local_names:
        if name in file.providers:
            reader.problem(
                ("providers", name), f"provider {name!r} has the name of a model served from the command line"
            )

    templates = raw.get("templates") or {}
    if (
        not isinstance(templates, dict)
        or not isinstance(templates.get("enabled", False), bool)
        or not isinstance(templates.get("answer", DEFAULT_ANSWER), str)
    ):
        reader.problem(("templates",), "templates must be {enabled: true|false, answer: TEXT}")
    else:
        file.templates = TemplatesConfig(
            templates.get("enabled", False), templates.get("answer", DEFAULT_ANSWER)
        )
    cooldown = raw.get("cooldown") or {}
    if not isinstance(cooldown, dict):
        reader.problem(("cooldown",), "cooldown must be {allowed_fails, cooldown_s, window_s}")
        cooldown = {}
    for key, low, kind, strict in (
        ("allowed_fails", 1, int, False),
        ("cooldown_s", 0, float, False),
        ("window_s", 0, float, True),
    ):
        if key in cooldown:
            value = reader.number(("cooldown", key), cooldown[key], low, kind, strict)
            if value is not None:
                setattr(file.cooldown, key, value)

    routes = raw.get("routes") or {}
    if not isinstance(routes, dict):
        reader.problem(("routes",), "routes must map names to chains (a list, or 'a -> b -> c')")
        routes = {}
    for name, value in routes.items():
        links = route_links(value)
        if isinstance(value, dict) and isinstance(name, str) and NAME.match(name):
            _read_split(reader, name, value, file, local)
            continue
        if (
            not isinstance(name, str)
            or not NAME.match(name)
            or name in local
            or name in file.providers
            or name == TEMPLATES
        ):
            reader.problem(
                ("routes", name),
                f"route name {name!r} must be letters, digits, '.', '_' or '-' and differ from every model and provider",
            )
            continue
        if not links or not all(links):
            reader.problem(("routes", name), f"route {name!r} must list one or more models")
            continue
        for i, link in enumerate(links):
            _check_link(
                reader,
                ("routes", name, i) if isinstance(value, list) else ("routes", name),
                link,
                file,
                local,
            )
        file.routes[name] = links
    default = raw.get("default", "")
    if not isinstance(default, str):
        reader.problem(("default",), f"default must be a model or route name, got {default!r}")
    elif default:
        if default not in file.routes and default not in file.splits:
            _check_link(reader, ("default",), default, file, local)
        file.default = default
    if reader.problems:
        raise ProvidersFileError("invalid providers file:\n  " + "\n  ".join(reader.problems))
    return file
