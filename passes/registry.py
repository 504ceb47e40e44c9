"""The pass registry: every pass by name with its contract, what it reads and writes, its options, and the default order.

A pass is a function (plan, options) → stats that rewrites `plan.program` and fills the analyses it
declares. Pipeline strings name passes with their options MLIR style: `dce,mla_fuse{form=absorbed},cost`.
The dsv3 ops a pass adds are not declared here: they are the ops whose records (`dsv3c.ops`) name the pass
as their stage; a pass declares the ops it removes.
"""

from dataclasses import dataclass, field
from typing import Callable

from dsv3c.ops import RECORDS


class PassSpecError(ValueError):
    """A pipeline string names an unknown pass or option, or gives an option a value it does not take."""


@dataclass(frozen=True)
class Option:
    """One pass option: what it means, its allowed values (None: any) and how its text is parsed."""

    help: str
    choices: tuple | None = None
    parse: Callable = str

    def check(self, pass_name: str, name: str, value: str):
        """The parsed value if the option takes it, else PassSpecError."""
        if self.choices is not None and value not in self.choices:
            raise PassSpecError(f"pass {pass_name}: option {name}={value!r} is not one of {', '.join(self.choices)}")
        try:
            return self.parse(value)
        except ValueError:
            raise PassSpecError(f"pass {pass_name}: option {name}={value!r} is not a valid {self.parse.__name__}") from None


@dataclass(frozen=True)
class Pass:
    """A named rewrite (plan, options) → stats, the dsv3 ops it removes (and, from the records, adds) and the
    analyses it touches."""

    name: str
    fn: Callable
    contract: str
    removes: frozenset = field(default_factory=frozenset)
    reads: frozenset = field(default_factory=frozenset)
    writes: frozenset = field(default_factory=frozenset)
    options: dict = field(default_factory=dict)  # name -> Option
    after: frozenset = field(default_factory=frozenset)  # passes that must run before this one when both run
    invalidates: frozenset = field(default_factory=frozenset)  # passes that may not run after this one ("*": all)

    @property
    def adds(self) -> frozenset:
        """The dsv3 ops this pass creates: those whose record names it as their stage."""
        return first_legal_after(self.name)

    def legal_after(self, legal: frozenset) -> frozenset:
        """The dsv3 ops legal after this pass, given those legal before it."""
        return (legal | self.adds) - self.removes


REGISTRY: dict[str, Pass] = {}



def first_legal_after(stage: str) -> frozenset:
    """The dsv3 ops whose records name `stage` ("capture" or a pass) as where they first appear."""
    return frozenset(name for name, r in RECORDS.items() if r.stage == stage)


# dsv3 ops the captured graph may contain (every family of dsv3c.ops is imported by now); passes move this set forward.
CAPTURED_OPS = first_legal_after("capture")


def legal_after(names: list[str], legal: frozenset = CAPTURED_OPS) -> frozenset:
    """The dsv3 ops legal after running the passes `names` on a graph where `legal` were."""
    for name in names:
        legal = REGISTRY[name].legal_after(legal)
    return frozenset(legal)


def register(name: str, contract: str, removes=(), reads=(), writes=(), options=None, after=(), invalidates=()):
    """Decorator: register fn as pass `name`: its ops removed, analyses read/written, options, order constraints."""

    def wrap(fn):
        REGISTRY[name] = Pass(name, fn, contract, frozenset(removes), frozenset(reads), frozenset(writes),
                              dict(options or {}), frozenset(after), frozenset(invalidates))
        return fn

    return wrap


DEFAULT_ORDER = ["dce", "mla_fuse", "fp8_quant", "expert_partition", "cost", "pipeline_partition", "lower_triton"]


def default_pipeline() -> list[str]:
    """The default pass order for a compile (each pass with its default options), limited to the passes that exist."""
    return [name for name in DEFAULT_ORDER if name in REGISTRY]


def _split_top_level(text: str) -> list[str]:
    """text split at commas outside braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PassSpecError(f"unbalanced '}}' in pass list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise PassSpecError(f"unbalanced '{{' in pass list {text!r}")
    return parts + [text[start:]]


def parse_pipeline(text: str) -> list[tuple[str, dict]]:
    """The (pass, options) list of a pipeline string 'a,b{k=v,k2=v2}', checked against the registry."""
    items = [p.strip() for p in _split_top_level(text)]
    if not any(items):
        raise PassSpecError("the pass list is empty")
    out = []
    for item in items:
        if not item:
            raise PassSpecError(f"empty pass name in pass list {text!r}")
        name, _, rest = item.partition("{")
        name = name.strip()
        if name not in REGISTRY:
            raise PassSpecError(f"unknown pass '{name}' (known: {', '.join(sorted(REGISTRY))})")
        opts = {}
        if rest:
            if not rest.endswith("}"):
                raise PassSpecError(f"pass {name}: options must end with '}}' in {item!r}")
            for pair in filter(None, (p.strip() for p in rest[:-1].split(","))):
                key, eq, value = pair.partition("=")
                key, value = key.strip(), value.strip()
                known = REGISTRY[name].options
                if not eq or key not in known:
                    names = ", ".join(sorted(known)) or "none"
                    raise PassSpecError(f"pass {name}: unknown option {pair!r} (options: {names})")
                opts[key] = known[key].check(name, key, value)
        out.append((name, opts))
    return out


def format_pipeline(items: list[tuple[str, dict]]) -> str:
    """The pipeline string of (pass, options) pairs; parse_pipeline reads it back to the same list."""
    parts = []
    for name, opts in items:
        parts.append(name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(opts.items())) + "}" if opts else ""))
    return ",".join(parts)
