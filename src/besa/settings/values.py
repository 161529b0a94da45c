"""Small value types every layer shares (torch-free): an N:M pattern, a weight quantization, and the one list of
each setting's allowed choices (``CHOICES``), checked by ``check_choice``."""

from __future__ import annotations

from dataclasses import dataclass

from besa.errors import BesaError

__all__ = ["CHOICES", "NMPattern", "QuantSpec", "check_choice", "parse_pattern"]

# The allowed values of the settings that take a word, each listed once (the flag's name -> its choices).
# Methods and allocations are registries of their own (``besa.registry``).
CHOICES: dict[str, tuple[str | None, ...]] = {
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "bos": ("auto", "always", "never"),
    "within-block": (None, "parallel", "sequential"),
    "quant-mode": ("joint", "rtn"),
    "expert-stats": ("routed", "pooled"),
    "refit-target": ("dense-stream", "dense", "pruned-input"),
    "refit-loss": ("mse", "token"),
    "rotate": ("none", "pca"),
}


def check_choice(flag: str, value: str | None) -> None:
    """Refuse a value that is not one of ``CHOICES[flag]``, naming the flag and its choices."""
    allowed = [c for c in CHOICES[flag] if c is not None]
    if value not in CHOICES[flag]:
        listed = ", ".join(allowed[:-1]) + f" or {allowed[-1]}" if len(allowed) > 1 else allowed[0]
        raise BesaError(f"unknown --{flag} {value!r}: choose {listed}")


@dataclass(frozen=True)
class QuantSpec:
    """``bits`` per weight and ``group_size`` input columns per scale (``0``: one scale per output row)."""

    bits: int
    group_size: int = 128

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise BesaError(f"--wbits must be between 2 and 8 (or 16 for no quantization), got {self.bits}")
        if self.group_size < 0:
            raise BesaError(
                f"--group-size must be positive, or 0 for one group per row, got {self.group_size}"
            )

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def groups(self, cols: int) -> int:
        """Number of groups of a row of ``cols`` input weights; the last one may be narrower."""
        if self.group_size == 0:
            return 1
        return -(-cols // self.group_size)


@dataclass(frozen=True)
class NMPattern:
    """N:M semi-structured sparsity: ``n`` zeros in every group of ``m`` consecutive input weights of a row."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if self.m <= 0 or self.n <= 0 or self.n >= self.m:
            raise BesaError(f"invalid N:M pattern {self.n}:{self.m}: need 0 < N < M")

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(text: str | None) -> NMPattern | None:
    """Parse ``"2:4"`` into ``NMPattern(2, 4)``; ``None``, ``""`` and ``"unstructured"`` give ``None``."""
    if text is None or text in ("", "unstructured"):
        return None
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise BesaError(f"invalid --pattern {text!r}: expected N:M with integers, for example 2:4")
    return NMPattern(int(parts[0]), int(parts[1]))
