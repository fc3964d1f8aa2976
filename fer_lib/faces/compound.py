"""Compound facial expressions (Du, Tao & Martinez, PNAS 2014) in the AU codebook.

Du et al. found that a compound expression ("happily surprised") is produced by the AUs
of its two basic parts: the prototypical AUs they measured for each compound are (with
one exception below) drawn from its parts' AUs. This module holds their table, the basic
parts of each compound, and registers every compound into `fer_lib.faces.au.CODEBOOK` (through
`fer_lib.faces.au.register_expression`) when it is imported, so AU heatmaps, the synthetic
generator, the RAF-DB compound loader and the training loss all see compound classes.

Names are snake_case and match `fer_lib.data.COMPOUND_EXPRESSIONS` (RAF-DB's 11 compound
classes) plus `fearfully_disgusted` (in Du et al., not in RAF-DB) and the three extra
categories `appalled`, `hatred`, `awed`. Du et al. describe appalled and hatred as
variants of angrily disgusted (their AUs are a subset of it, AU7 coming from anger) and
awed as a variant of fearfully surprised; we give them those parts.

The exception: sadly surprised has AU25 (lips part), which neither the paper's sadness nor
surprise codebook entry lists; its region (mouth centre) lies inside surprise's AU26 (jaw
drop) region, so the heatmap still covers only its parts' regions (see
`region_anchors` and the tests).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from fer_lib.faces.au import AU_REGIONS, CODEBOOK, EXPRESSIONS, combine_aus, register_expression
from fer_lib.faces.landmarks import FaceLandmarks

#: prototypical AUs of each compound expression (Du et al. 2014, Table 1), in RAF-DB's order first
COMPOUND_AUS: dict[str, tuple[int, ...]] = {
    "happily_surprised": (1, 2, 12, 25),
    "happily_disgusted": (10, 12, 25),
    "sadly_fearful": (1, 4, 20, 25),
    "sadly_angry": (4, 15),
    "sadly_surprised": (1, 4, 25, 26),
    "sadly_disgusted": (4, 10),
    "fearfully_angry": (4, 20, 25),
    "fearfully_surprised": (1, 2, 5, 20, 25),
    "angrily_surprised": (4, 25, 26),
    "angrily_disgusted": (4, 10, 17),
    "disgustedly_surprised": (1, 2, 5, 10),
    "fearfully_disgusted": (1, 4, 10, 20, 25),
    "appalled": (4, 10),
    "hatred": (4, 7, 10),
    "awed": (1, 2, 5, 25),
}

#: the two basic expressions each compound blends
COMPOUND_PARTS: dict[str, tuple[str, str]] = {
    "happily_surprised": ("happiness", "surprise"),
    "happily_disgusted": ("happiness", "disgust"),
    "sadly_fearful": ("sadness", "fear"),
    "sadly_angry": ("sadness", "anger"),
    "sadly_surprised": ("sadness", "surprise"),
    "sadly_disgusted": ("sadness", "disgust"),
    "fearfully_angry": ("fear", "anger"),
    "fearfully_surprised": ("fear", "surprise"),
    "angrily_surprised": ("anger", "surprise"),
    "angrily_disgusted": ("anger", "disgust"),
    "disgustedly_surprised": ("disgust", "surprise"),
    "fearfully_disgusted": ("fear", "disgust"),
    "appalled": ("disgust", "anger"),
    "hatred": ("disgust", "anger"),
    "awed": ("fear", "surprise"),
}

#: every compound name, RAF-DB's 11 first (their order), then fearfully_disgusted and the extras
ALL_COMPOUNDS: tuple[str, ...] = tuple(COMPOUND_AUS)
#: RAF-DB's 11 compound classes (same order as fer_lib.data.COMPOUND_EXPRESSIONS)
RAFDB_COMPOUNDS: tuple[str, ...] = ALL_COMPOUNDS[:11]
#: the categories Du et al. add beyond the 12 two-part compounds
EXTRA_COMPOUNDS: tuple[str, ...] = ("appalled", "hatred", "awed")


def check_compound(name: str) -> str:
    """Return `name` if it is a known compound expression, else raise ValueError listing them."""
    if name not in COMPOUND_AUS:
        raise ValueError(f"unknown compound expression {name!r}; valid: {', '.join(ALL_COMPOUNDS)}")
    return name


def is_compound(name: str) -> bool:
    """True for a compound expression name."""
    return name in COMPOUND_AUS


def compound_parts(name: str) -> tuple[str, str]:
    """The two basic expressions a compound blends, e.g. happily_surprised -> (happiness, surprise)."""
    return COMPOUND_PARTS[check_compound(name)]


def parts_aus(name: str) -> tuple[int, ...]:
    """Union of the codebook AUs of a compound's basic parts (sorted)."""
    a, b = compound_parts(name)
    return tuple(sorted(set(CODEBOOK[a]) | set(CODEBOOK[b])))


def region_anchors(aus: Sequence[int]) -> set[str]:
    """The anchor names whose blobs make up the map of these AUs (its spatial support)."""
    return {anchor for au in aus for anchor in AU_REGIONS[au]}


def register_compounds(names: Sequence[str] | None = None) -> tuple[str, ...]:
    """Register compound expressions (default: all) into fer_lib.faces.au.CODEBOOK; idempotent."""
    names = ALL_COMPOUNDS if names is None else tuple(names)
    for name in names:
        register_expression(check_compound(name), COMPOUND_AUS[name])
    return names


def compound_heatmap(landmarks: FaceLandmarks | np.ndarray, name: str, size: int | Sequence[int],
                     sigma: float | None = None, sigma_mode: str = "image") -> np.ndarray:
    """The compound's AU heatmap (Du et al. AUs, max over blobs, in [0, 1])."""
    return combine_aus(landmarks, COMPOUND_AUS[check_compound(name)], size, sigma, sigma_mode)


def part_heatmaps(landmarks: FaceLandmarks | np.ndarray, name: str, size: int | Sequence[int],
                  sigma: float | None = None, sigma_mode: str = "image") -> dict[str, np.ndarray]:
    """{part: heatmap} of the compound's two basic parts, from the paper's basic codebook."""
    return {part: combine_aus(landmarks, CODEBOOK[part], size, sigma, sigma_mode) for part in compound_parts(name)}


def compound_table() -> list[dict[str, object]]:
    """One row per compound: name, parts, Du et al. AUs, the parts' AUs and the AUs outside them."""
    rows = []
    for name in ALL_COMPOUNDS:
        union = parts_aus(name)
        rows.append({"compound": name, "parts": "+".join(COMPOUND_PARTS[name]),
                     "aus": ",".join(map(str, COMPOUND_AUS[name])), "parts_aus": ",".join(map(str, union)),
                     "aus_outside_parts": ",".join(str(a) for a in COMPOUND_AUS[name] if a not in union)})
    return rows


def _check_tables() -> None:
    for name, parts in COMPOUND_PARTS.items():
        bad = [p for p in parts if p not in EXPRESSIONS]
        if bad or name not in COMPOUND_AUS:
            raise RuntimeError(f"compound table inconsistent for {name!r}: parts {parts}")


_check_tables()
register_compounds()
