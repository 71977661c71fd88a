"""What an optimizer state is, as a small typed record (the key of every state-period rule).

A per-coordinate state of an inner optimizer is either a first moment u (SGD's momentum buffer,
Adam's ``exp_avg``, MT-DAO's j-th momentum u^j) or the second moment v (``exp_avg_sq``).
DES-LOC gives first moments the period K_u (MT-DAO momentum j its own K_j) and the second moment
K_v. The text forms ``"u"``, ``"u<j>"`` and ``"v"`` are accepted wherever a role is, and a role
compares (and hashes) equal to its text form, so ``role == "v"`` and ``{"u": K}[role]`` work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from desloc.errors import ConfigError

_TEXT = re.compile(r"^(u)(\d*)$|^(v)$")


@dataclass(frozen=True, eq=False)
class StateRole:
    """``moment``: 1 (first, u) or 2 (second, v); ``index``: MT-DAO's j for u^j, else None."""

    moment: int
    index: int | None = None

    def __post_init__(self) -> None:
        if self.moment not in (1, 2) or (self.index is not None and (self.moment != 1 or self.index < 0)):
            raise ConfigError(f"a state role is a first moment (moment=1, optional index j >= 0) or the second "
                              f"moment (moment=2), got moment={self.moment!r}, index={self.index!r}")

    @classmethod
    def parse(cls, role: "StateRole | str") -> "StateRole":
        """``"u"``, ``"u3"``, ``"v"`` (or a StateRole) -> StateRole."""
        if isinstance(role, StateRole):
            return role
        match = _TEXT.match(str(role))
        if match is None:
            raise ConfigError(f"unknown state role {role!r}; use 'u' (first moment), 'u<j>' (MT-DAO's j-th "
                              "first moment, e.g. 'u1') or 'v' (second moment)")
        if match.group(3):
            return cls(2)
        return cls(1, int(match.group(2)) if match.group(2) else None)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (StateRole, str)):
            return str(self) == str(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(str(self))

    def __repr__(self) -> str:
        return f"StateRole({str(self)!r})"

    def __str__(self) -> str:
        if self.moment == 2:
            return "v"
        return "u" if self.index is None else f"u{self.index}"


U, V = StateRole(1), StateRole(2)
