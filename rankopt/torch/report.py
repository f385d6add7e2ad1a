"""What :func:`~rankopt.torch.apply_low_rank` did: the :class:`ConversionReport`.

``apply_low_rank`` still returns the model (as PEFT's ``get_peft_model`` returns one); the
report of its last call is ``model.rankopt_report``: every module it converted (name, kind,
``m x n`` shape, rank, mode, the layer it shares factors with) and every module it looked at
and left as it was, with a reason:

============================  =====================================================  ========
reason                        what                                                   warned
============================  =====================================================  ========
``tied``                      its weight is shared with a module that is not          yes
                              converted (converting one side would untie them)
``grouped conv``              ``groups != 1``                                         yes
``unsupported options``       e.g. ``padding_mode="reflect"``, an embedding's         yes
                              ``max_norm``, a padding string that is not symmetric
``too small for the rank``    ``rank > min(out, in)``                                 yes
``non-float weight``          quantized weights                                       yes
``unsupported type``          holds a matrix weight but is no convertible type        yes
                              (e.g. ``nn.Conv3d``, a subclass of ``nn.Linear``)
``excluded``                  named by ``exclude_modules``                            no
``modules_to_save``           trained whole                                           no
``not targeted``              an ``nn.Embedding`` with ``target_modules=None``        no
                              (embeddings are converted only when named)
============================  =====================================================  ========

With ``target_modules=None`` the "warned" reasons are also listed in one ``UserWarning``;
named targets that cannot be converted raise instead. :func:`no_match_message` builds the
error of a ``target_modules`` that matches nothing convertible: what it did match, and the
close names among the convertible modules.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ConvertedModule", "SkippedModule", "ConversionReport", "WARNED", "no_match_message"]

#: skip reasons that ``target_modules=None`` lists in its warning
WARNED = ("tied", "grouped conv", "unsupported options", "too small for the rank",
          "non-float weight", "unsupported type")  # fmt: skip


@dataclass(frozen=True)
class ConvertedModule:
    """A converted module: ``kind`` as in :mod:`rankopt.torch.kinds`, ``shape`` the m x n
    matrix of its factors, ``tied_to`` the first layer sharing its factors (or None)."""

    name: str
    kind: str
    shape: tuple[int, int]
    rank: int
    mode: str
    tied_to: str | None = None


@dataclass(frozen=True)
class SkippedModule:
    """A module left as it was: its class name, the reason (see the module doc), details."""

    name: str
    type: str
    reason: str
    detail: str


@dataclass
class ConversionReport:
    """What one ``apply_low_rank`` call converted and skipped (``model.rankopt_report``)."""

    target_modules: Any = None
    converted: list[ConvertedModule] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)

    def skip(self, name: str, module: Any, reason: str, detail: str) -> None:
        """Record a skipped module."""
        self.skipped.append(SkippedModule(name, type(module).__name__, reason, detail))

    def skipped_for(self, *reasons: str) -> list[SkippedModule]:
        """The skipped modules with one of ``reasons`` (all with none given)."""
        return [s for s in self.skipped if not reasons or s.reason in reasons]

    @property
    def converted_names(self) -> list[str]:
        return [c.name for c in self.converted]

    def __str__(self) -> str:
        lines = [f"apply_low_rank(target_modules={self.target_modules!r}): "
                 f"{len(self.converted)} converted, {len(self.skipped)} skipped"]  # fmt: skip
        for c in self.converted:
            tie = f", tied to {c.tied_to!r}" if c.tied_to else ""
            lines.append(f"  converted {c.name!r}: {c.kind} {c.shape[0]} x {c.shape[1]}, "
                         f"rank {c.rank}, {c.mode}{tie}")  # fmt: skip
        lines += [f"  skipped {s.name!r} ({s.type}): {s.reason}: {s.detail}" for s in self.skipped]
        return "\n".join(lines)


def no_match_message(target: Any, exclude: Any, matched: list[tuple[str, str]],
                     convertible: list[tuple[str, str]]) -> str:  # fmt: skip
    """The error of a ``target_modules`` that matches no convertible module.

    ``matched``: ``(name, class name)`` of the modules it did match (none convertible);
    ``convertible``: ``(name, class name)`` of the model's convertible modules (full names;
    attention projections included). Names the close candidates (``difflib``) among their full
    names and last components.
    """
    msg = (f"no nn.Linear, nn.Conv2d or nn.Embedding module matches target_modules={target!r} "
           "(nor an nn.Conv1d, a transformers Conv1D or an nn.MultiheadAttention projection; "
           f"exclude_modules={exclude!r})")  # fmt: skip
    if matched:
        shown = ", ".join(f"{n!r} ({t})" for n, t in matched[:6])
        msg += f". It matched only modules that cannot be converted: {shown}"
    short: dict[str, tuple[str, str]] = {}
    for name, typ in convertible:
        short.setdefault(name.rsplit(".", 1)[-1], (name, typ))
    wanted = [target] if isinstance(target, str) else list(target or []) if not hasattr(
        target, "pattern") else [target.pattern]  # fmt: skip
    close: list[str] = []
    for t in wanted:
        for c in difflib.get_close_matches(str(t), list(short), n=3, cutoff=0.5):
            close.append(f"{c!r} ({short[c][1]}, e.g. {short[c][0]!r})")
        full = [n for n, _ in convertible]
        close += [repr(c) for c in difflib.get_close_matches(str(t), full, n=2, cutoff=0.6)]
    if close:
        msg += ". Close names: " + ", ".join(dict.fromkeys(close))
    if short:
        names = sorted(short)
        more = f", ... ({len(names)} in all)" if len(names) > 12 else ""
        msg += ". Convertible module names: " + ", ".join(names[:12]) + more
    else:
        msg += ". The model has no convertible module"
    return msg
