"""The pass registry: every pass by name with its one-line contract, and the default order."""

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Pass:
    """A named rewrite (program, context) → (program, stats) and the dsv3 ops it adds or removes."""

    name: str
    fn: Callable
    contract: str
    adds: frozenset = field(default_factory=frozenset)
    removes: frozenset = field(default_factory=frozenset)
    after: frozenset = field(default_factory=frozenset)  # passes that must run before this one when both run
    invalidates: frozenset = field(default_factory=frozenset)  # passes that may not run after this one ("*": all)

    def legal_after(self, legal: frozenset) -> frozenset:
        """The dsv3 ops legal after this pass, given those legal before it."""
        return (legal | self.adds) - self.removes


REGISTRY: dict[str, Pass] = {}

# dsv3 ops the captured graph may contain; passes move this set forward.
CAPTURED_OPS = frozenset({"rms_norm", "rope", "swiglu", "moe_gate", "moe_experts", "mla_attention"})


def legal_after(names: list[str], legal: frozenset = CAPTURED_OPS) -> frozenset:
    """The dsv3 ops legal after running the passes `names` on a graph where `legal` were."""
    for name in names:
        legal = REGISTRY[name].legal_after(legal)
    return frozenset(legal)


def register(name: str, contract: str, adds=(), removes=(), after=(), invalidates=()):
    """Decorator: register fn as pass `name`, with its ops added/removed and its order constraints."""

    def wrap(fn):
        REGISTRY[name] = Pass(name, fn, contract, frozenset(adds), frozenset(removes), frozenset(after),
                              frozenset(invalidates))
        return fn

    return wrap


def default_pipeline() -> list[str]:
    """The default pass order for a compile, limited to the passes that exist."""
    order = ["dce", "mla_fuse", "fp8_quant", "cost", "lower_triton"]
    return [name for name in order if name in REGISTRY]
