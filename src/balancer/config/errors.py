"""The one error a configuration problem raises, wherever it was found."""

from __future__ import annotations

from collections.abc import Sequence

from balancer.errors import BalancerError


class ConfigError(BalancerError):
    """A configuration problem, with where it is and what was expected.

    One error reads `source: line N: where: message` (the line when the format
    has lines and it is known). An error raised for a whole file carries every
    problem found in it: `errors` lists them (this one first), `str()` gives a
    count and then one line each, and `source`, `where`, `message` and `line` are
    those of the first.
    """

    def __init__(self, source: str, where: str, message: str, *, line: int | None = None) -> None:
        super().__init__(source, where, message)
        self.source = source
        self.where = where
        self.message = message
        self.line = line
        """Line of the file the error is on, when the format has lines and it is known."""
        self.more: tuple[ConfigError, ...] = ()

    @classmethod
    def collected(cls, errors: Sequence[ConfigError]) -> ConfigError:
        """One error standing for all of `errors` (at least one), the first one first."""
        first = errors[0]
        error = cls(first.source, first.where, first.message, line=first.line)
        error.more = tuple(errors[1:])
        return error

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        return (self, *self.more)

    def describe(self) -> str:
        """This error alone, on one line."""
        parts = [self.source] if self.source else []
        if self.line is not None and not self.where.startswith("line "):
            parts.append(f"line {self.line}")
        if self.where:
            parts.append(self.where)
        parts.append(self.message)
        return ": ".join(parts)

    def __str__(self) -> str:
        if not self.more:
            return self.describe()
        lines = [f"{self.source}: {len(self.errors)} errors"]
        lines.extend(error.describe() for error in self.errors)
        return "\n".join(lines)
