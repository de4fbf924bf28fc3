"""Drop schedules: which decoder layers drop visual tokens, and how many each keeps.

A schedule is progressive: at each drop layer the *remaining* visual tokens are cut to
`floor(n * keep)`, so keeps compound. Retention is layer-averaged, as in the V²Drop paper:
the mean over all decoder layers of (visual tokens the layer processes) / (visual tokens at
layer 0).

Worked example, 28 layers, layers (3, 16, 22), keep (0.25, 0.5, 0.0):
    layers 0-2   (3 layers)  see 100 %
    layers 3-15  (13 layers) see  25 %
    layers 16-21 (6 layers)  see 12.5 %
    layers 22-27 (6 layers)  see   0 %
    retention = (3*1 + 13*0.25 + 6*0.125 + 6*0) / 28 = 7 / 28 = 0.25
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The default shape for `for_retention`: the 28-layer video schedule of the method notes,
# (3, 16, 22) with the later stages keeping 0.5 and 0.0 of what reaches them. Other depths
# scale the drop layers by depth (32 layers -> 3, 18, 25; 8 layers -> 1, 5, 6).
_LAYER_FRACTIONS = (3 / 28, 16 / 28, 22 / 28)
_LATER_STAGE_KEEPS = (0.5, 0.0)

# floor(n * keep) in floating point turns 100 * 0.29 into 28; this slack makes it 29.
FLOOR_EPS = 1e-9


def keep_count(num_tokens: int, keep: float) -> int:
    """Tokens kept out of `num_tokens`: floor(n * keep), clamped to [0, n]."""
    return min(num_tokens, max(0, math.floor(num_tokens * keep + FLOOR_EPS)))


@dataclass(frozen=True)
class Schedule:
    """Drop layers (0-based decoder indices, strictly increasing) and the relative keep of each."""

    layers: tuple[int, ...]
    keep: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "keep", tuple(float(k) for k in self.keep))
        if len(self.layers) != len(self.keep):
            raise ValueError(
                f"Schedule needs one keep per drop layer: got {len(self.layers)} layers "
                f"{self.layers} and {len(self.keep)} keeps {self.keep}"
            )
        for k in self.keep:
            if not 0.0 <= k <= 1.0 or math.isnan(k):
                raise ValueError(f"Schedule keep values must be in [0, 1]; got {k} in {self.keep}")
        if any(i < 1 for i in self.layers):
            raise ValueError(
                f"Drop layers must be >= 1 (layer i is scored by what layer i-1 wrote); got {self.layers}"
            )
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise ValueError(f"Drop layers must be strictly increasing with no duplicates; got {self.layers}")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def for_retention(cls, num_layers: int, retention: float = 0.25) -> Schedule:
        """The default-shaped schedule whose layer-averaged retention is `retention`.

        Only the first stage's keep is solved for; the later stages keep fixed fractions
        (0.5, then 0.0) of what reaches them. Retention is linear in the first keep k:
            retention * L = l1 + k * ((l2 - l1) + 0.5 * (l3 - l2))
        so k = (retention * L - l1) / ((l2 - l1) + 0.5 * (l3 - l2)).
        retention == 1.0 means "no dropping" and gives the identity schedule (all keeps 1.0).
        Raises ValueError for a retention this shape cannot reach (k outside [0, 1]).
        """
        if not 0.0 < retention <= 1.0:
            raise ValueError(f"retention must be in (0, 1]; got {retention}")
        layers = default_drop_layers(num_layers)
        if retention == 1.0:
            return cls(layers=layers, keep=(1.0,) * len(layers))
        first_keep = _solve_first_keep(num_layers, layers, retention)
        return cls(layers=layers, keep=(first_keep, *_LATER_STAGE_KEEPS))

    # -- accounting -----------------------------------------------------------------------
    def check_depth(self, num_layers: int) -> None:
        """Raise ValueError if a drop layer does not exist in a model of this depth."""
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise ValueError(
                f"Drop layers {bad} are out of range for a model with {num_layers} decoder layers "
                f"(valid: 1..{num_layers - 1})"
            )

    def keep_fraction_per_layer(self, num_layers: int) -> list[float]:
        """Fraction of the visual tokens each layer processes, ignoring integer rounding."""
        self.check_depth(num_layers)
        fractions, current = [], 1.0
        drops = dict(zip(self.layers, self.keep))
        for layer in range(num_layers):
            current *= drops.get(layer, 1.0)
            fractions.append(current)
        return fractions

    def retention(self, num_layers: int) -> float:
        """Layer-averaged visual retention (no integer rounding; see `tokens_per_layer`)."""
        return sum(self.keep_fraction_per_layer(num_layers)) / num_layers

    def tokens_per_layer(self, num_visual: int, num_layers: int) -> list[int]:
        """Visual tokens entering each layer for `num_visual` at layer 0, with floor rounding."""
        self.check_depth(num_layers)
        counts, current = [], num_visual
        drops = dict(zip(self.layers, self.keep))
        for layer in range(num_layers):
            if layer in drops:
                current = keep_count(current, drops[layer])
            counts.append(current)
        return counts

    @property
    def is_identity(self) -> bool:
        """True when the schedule keeps every token (the patched model must equal the stock one)."""
        return all(k == 1.0 for k in self.keep)


def default_drop_layers(num_layers: int) -> tuple[int, ...]:
    """(3, 16, 22) for 28 layers, scaled by depth; needs at least 4 layers."""
    if num_layers < 4:
        raise ValueError(f"The default schedule needs at least 4 decoder layers; got {num_layers}")
    layers: list[int] = []
    for fraction in _LAYER_FRACTIONS:
        lowest = layers[-1] + 1 if layers else 1
        layers.append(max(lowest, round(fraction * num_layers)))
    return tuple(layers)


def _solve_first_keep(num_layers: int, layers: tuple[int, ...], retention: float) -> float:
    l1, l2, l3 = layers
    slope = (l2 - l1) + _LATER_STAGE_KEEPS[0] * (l3 - l2)
    first_keep = (retention * num_layers - l1) / slope
    if not 0.0 <= first_keep <= 1.0:
        lowest = l1 / num_layers
        highest = (l1 + slope) / num_layers
        raise ValueError(
            f"retention {retention} cannot be reached by the default schedule shape for "
            f"{num_layers} layers (drop layers {layers}, later keeps {_LATER_STAGE_KEEPS}); "
            f"reachable: {lowest:.4f}..{highest:.4f}, or exactly 1.0 for no dropping"
        )
    return first_keep
