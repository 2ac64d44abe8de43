"""The mechanism registry: one frozen `MechanismSpec` per mechanism, stored on its class.

A mechanism joins attnlab by decorating its class with `@register(MechanismSpec(...))`.
`create` builds one by name, `list_specs` filters the catalogue by any spec field, and the
shared test suite parametrises over `list_specs()` so a new mechanism is tested by existing.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch.nn as nn

from attnlab.ops._dispatch import BACKENDS as _BACKEND_TABLE

LAYOUTS = ("seq", "2d", "3d", "cross", "pool")
# Where a mechanism's formula comes from (MechanismSpec.provenance; the details go in `source`):
#   official-code   the authors' released code: "owner/repo path/file.py::Name"
#   paper           the paper's equations: "Sec. 3, Eqs. (4)-(6)"
#   reconstruction  no code and no equation to follow: what was guessed, in `source`
PROVENANCES = ("official-code", "paper", "reconstruction")
BACKENDS = tuple(_BACKEND_TABLE)  # the names of attnlab.ops' one backend table


@dataclass(frozen=True)
class MechanismSpec:
    """What a mechanism is and what it supports. Frozen; lives on the class as `cls.spec`."""

    name: str                       # registry key, stable snake_case
    paper: str                      # the paper's title
    year: int
    family: str                     # softmax, linear, local, sparse, ...
    layout: str                     # one of LAYOUTS
    time: str                       # time complexity, e.g. "O(N^2 d)"
    memory: str                     # memory complexity, e.g. "O(N) (SDPA)"
    exact: bool                     # does it equal softmax attention?
    causal: bool = False            # supports forward(..., is_causal=True), for every layout
    # A constructor option `causal=` that makes chosen axes causal (per-axis causal windows, as
    # NATTEN's is_causal for 2-D/3-D); independent of `causal`, which is forward's flag.
    causal_axes: bool = False
    attn_mask: bool = False         # supports attn_mask
    kv_cache: bool = False          # supports incremental decoding with a KVCache
    cross: bool = False             # supports keys/values from another sequence
    backends: tuple[str, ...] = ()  # ops.attention backends it can run on
    variants: tuple[str, ...] = ()  # values of its `variant` option ("name:variant" in create)
    url: str = ""
    provenance: str = ""            # one of PROVENANCES ("" only for throwaway test specs)
    source: str = ""                # repository + file, equation numbers, or what was reconstructed
    # A tiny configuration for the shared test suite (options only, dim/num_heads are chosen
    # by the suite). Excluded from hashing/equality because a mapping is not hashable.
    test_kwargs: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # More configurations the shared suite also runs (e.g. other variants), each a full options
    # mapping; every one must support what the spec's flags claim.
    test_configs: tuple[Mapping[str, Any], ...] = field(default=(), compare=False, hash=False)
    cls: type | None = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"spec name must be lower snake_case, got {self.name!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"spec {self.name!r}: layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.provenance and self.provenance not in PROVENANCES:
            raise ValueError(f"spec {self.name!r}: provenance must be one of {PROVENANCES}, got {self.provenance!r}")
        if self.provenance and not self.source:
            raise ValueError(f"spec {self.name!r}: provenance {self.provenance!r} needs a source "
                             "(repository + file, equation numbers, or what was reconstructed)")
        unknown = set(self.backends) - set(BACKENDS)
        if unknown:
            raise ValueError(f"spec {self.name!r}: unknown backends {sorted(unknown)}, known {BACKENDS}")
        object.__setattr__(self, "backends", tuple(self.backends))
        object.__setattr__(self, "variants", tuple(self.variants))
        object.__setattr__(self, "test_kwargs", types.MappingProxyType(dict(self.test_kwargs)))
        object.__setattr__(self, "test_configs",
                           tuple(types.MappingProxyType(dict(c)) for c in self.test_configs))

    def supports(self, feature: str) -> bool:
        return bool(getattr(self, feature))

    def options(self) -> dict[str, inspect.Parameter]:
        """Constructor options beyond dim and num_heads, by name."""
        params = inspect.signature(self.cls.__init__).parameters
        return {n: p for n, p in params.items()
                if n not in ("self", "dim", "num_heads") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


_REGISTRY: dict[str, MechanismSpec] = {}


def register(spec: MechanismSpec) -> Callable[[type], type]:
    """Class decorator: attach `spec` to the class and add it to the registry."""
    def wrap(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register expects an nn.Module subclass, got {cls!r}")
        if spec.name in _REGISTRY and _REGISTRY[spec.name].cls is not cls:
            raise ValueError(f"mechanism {spec.name!r} is already registered by {_REGISTRY[spec.name].cls}")
        bound = dataclasses.replace(spec, test_kwargs=dict(spec.test_kwargs),
                                    test_configs=tuple(dict(c) for c in spec.test_configs), cls=cls)
        cls.spec = bound
        _REGISTRY[spec.name] = bound
        return cls
    return wrap


def _load_builtin() -> None:
    # Importing the mechanisms package registers every built-in mechanism.
    import attnlab.mechanisms  # noqa: F401


def get_spec(name: str) -> MechanismSpec:
    """The spec registered under `name` ("name" or "name:variant"); a ValueError lists close
    names when there is none."""
    _load_builtin()
    if not isinstance(name, str):
        raise TypeError(f"mechanism name must be a str, got {type(name).__name__}")
    name = name.split(":", 1)[0]
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown mechanism {name!r}{hint} (known: {', '.join(sorted(_REGISTRY))})") from None


def list_specs(**filters: Any) -> list[MechanismSpec]:
    """All specs, sorted by name, keeping those whose fields equal every filter.

    A filter on a tuple field (`backends="flex"`) keeps specs whose tuple contains the value.
    """
    _load_builtin()
    names = {f.name for f in dataclasses.fields(MechanismSpec)}
    unknown = sorted(set(filters) - names)
    if unknown:
        raise TypeError(f"list_specs got unknown filter(s) {unknown}; spec fields are {sorted(names)}")

    def keep(spec: MechanismSpec) -> bool:
        for key, want in filters.items():
            have = getattr(spec, key)
            if isinstance(have, tuple) and not isinstance(want, tuple):
                if want not in have:
                    return False
            elif have != want:
                return False
        return True

    return [s for s in sorted(_REGISTRY.values(), key=lambda s: s.name) if keep(s)]


def create(name: str, dim: int, num_heads: int = 8, **options: Any) -> nn.Module:
    """Build the mechanism registered under `name` for width `dim` with `num_heads` heads.

    "name:variant" is shorthand for `create("name", ..., variant="variant")`, for mechanisms
    that take a `variant` option (e.g. "deconstructed:fixed").
    """
    spec = get_spec(name)
    if ":" in name:
        if "variant" in options:
            raise TypeError(f"{name!r} names a variant and variant={options['variant']!r} was also given")
        options["variant"] = name.split(":", 1)[1]
    accepted = spec.options()
    takes_var_kw = any(p.kind is p.VAR_KEYWORD
                       for p in inspect.signature(spec.cls.__init__).parameters.values())
    if not takes_var_kw:
        for key in options:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=2, cutoff=0.6)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise TypeError(f"mechanism {name!r} got unknown option {key!r}{hint} "
                                f"(accepted: {', '.join(accepted) or 'none'})")
    return spec.cls(dim, num_heads, **options)
