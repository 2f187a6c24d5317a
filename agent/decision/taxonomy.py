"""Map registry (SIV) make/model strings onto the model bundle's label taxonomy.

The registry's make (D.1) and commercial name (D.3) are free text. :meth:`Taxonomy.resolve_detail`
tries, in this order, and the first hit wins (see docs/DECISION.md for worked examples):

1. ``exact``  the spelling-normalised model equals a label's canonical model name;
2. ``alias``  ... or one of the label's aliases (``labels.csv``);
3. ``rule``   the canonical form (make-specific rewrites: Mercedes ``A-KLASSE`` → ``CLASSE A``, BMW
   ``320D`` → ``SERIE 3``, ``DS 3`` → ``DS3``, ``PHASE 2``/``MK7`` dropped, leading make name dropped),
   then that form stripped step by step: generation words (``NOUVELLE``, ``III``, ``4``), then trim and
   powertrain words (``ACTIVE``, ``GT LINE``, ``HYBRID4``), then body words (``ESTATE``, ``SW``). The
   least-stripped form that names a label wins, so a bundle with a ``CLIO ESTATE`` label keeps it;
4. ``fuzzy``  rapidfuzz ``token_sort_ratio`` against the labels of the same make, at or above
   ``min_score``, and only when every "identity" token (one with a digit, or of three letters or
   fewer) is equal on both sides: ``208`` never becomes ``2008``, ``CLASSE A`` never ``CLASSE B``;
5. ``none``   unsupported. A guess is never made; the decision never flags an unsupported vehicle.

Words that tell vehicles apart (``PICASSO``, ``AIRCROSS``, ``GRAND``, ``SPORT``, ``CROSSBACK``) are in
no strip list, so ``C4 PICASSO`` never maps to ``C4`` unless the bundle lists it as an alias.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal, cast

import numpy as np
from rapidfuzz import fuzz

from iaflash.agent.errors import TaxonomyError
from iaflash.engines.bundle import Bundle, Label

__all__ = [
    "DEFAULT_MIN_SCORE",
    "MAKE_ALIASES",
    "OTHER_MAKES",
    "Method",
    "Resolution",
    "Taxonomy",
    "TaxonomyError",
    "canonical_model",
    "fuzzy_score",
    "norm_make",
    "norm_model",
    "norm_text",
    "split_make",
    "strip_candidates",
]

Method = Literal["exact", "alias", "rule", "fuzzy", "none"]
DEFAULT_MIN_SCORE = 88.0
CACHE_SIZE = 4096

# Registry spellings of the same make; the value is the canonical make key.
MAKE_ALIASES = {
    "MERCEDES BENZ": "MERCEDES",
    "MERCEDESBENZ": "MERCEDES",
    "MB": "MERCEDES",
    "MERCEDES AMG": "MERCEDES",
    "VW": "VOLKSWAGEN",
    "VOLKSWAGEN VW": "VOLKSWAGEN",
    "VOLKS WAGEN": "VOLKSWAGEN",
    "ALFA": "ALFA ROMEO",
    "ALFAROMEO": "ALFA ROMEO",
    "LAND ROVER": "LAND ROVER",
    "LANDROVER": "LAND ROVER",
    "DS AUTOMOBILES": "DS",
    "CITROEN DS": "DS",
    "SSANG YONG": "SSANGYONG",
    "ROLLS ROYCE": "ROLLS ROYCE",
    "ROLLSROYCE": "ROLLS ROYCE",
}

# Labels whose make is one of these are an explicit "not a known vehicle" class.
OTHER_MAKES = frozenset({"OTHER", "UNKNOWN", "AUTRE"})

# Stage 1: words that only say "a newer version of" (roman/arabic generations are handled in code).
GENERATION_WORDS = frozenset(
    {"NOUVELLE", "NOUVEAU", "NOUVEL", "NEW", "NEUE", "NEUER", "RESTYLE", "RESTYLEE", "FACELIFT"}
)
# Stage 2: trim levels and powertrains; the body of the car is the same.
TRIM_WORDS = frozenset(
    {
        "ACTIVE",
        "ALLURE",
        "BUSINESS",
        "GT LINE",
        "RS LINE",
        "R LINE",
        "S LINE",
        "ST LINE",
        "M SPORT",
        "AMG LINE",
        "LIFE",
        "ZEN",
        "INTENS",
        "INITIALE PARIS",
        "LIMITED",
        "EDITION",
        "PREMIUM",
        "EXCLUSIVE",
        "FEEL",
        "SHINE",
        "STYLE",
        "ICONIC",
        "TECHNO",
        "EVOLUTION",
        "TEKNA",
        "ACENTA",
        "VISIA",
        "TITANIUM",
        "TREND",
        "TRENDLINE",
        "COMFORTLINE",
        "CONFORTLINE",
        "HIGHLINE",
        "CARAT",
        "LOUNGE",
        "AMBIENTE",
        "DYNAMIQUE",
        "EXPRESSION",
        "AUTHENTIQUE",
        "LAUREATE",
        "PRESTIGE",
        "LUXE",
        "CONFORT",
        "STEPWAY",
        "GT",
        "GTI",
        "GTD",
        "GTE",
        "RS",
        "AMG",
        "HYBRID",
        "HYBRIDE",
        "HYBRID4",
        "E TECH",
        "ETECH",
        "E TENSE",
        "PLUG IN",
        "PHEV",
        "HEV",
        "MHEV",
        "E HYBRID",
        "FULL HYBRID",
        "ELECTRIC",
        "ELECTRIQUE",
        "EV",
        "HDI",
        "BLUEHDI",
        "TDI",
        "TSI",
        "TFSI",
        "DCI",
        "TCE",
        "PURETECH",
        "ECOBOOST",
        "CDI",
        "BLUETEC",
        "D",
        "E",
        "4MATIC",
        "QUATTRO",
        "XDRIVE",
        "4X4",
        "4WD",
        "AWD",
        "AUTO",
        "BVA",
        "EDC",
        "DSG",
        "EAT6",
        "EAT8",
        "GPL",
        "LPG",
        "BIFUEL",
        "FLEXFUEL",
        "FAP",
        "HDI FAP",
        "E HDI",
        "EHDI",
        "VTI",
        "THP",
        "CRDI",
        "TDCI",
        "ECOBLUE",
        "SKYACTIV",
        "VVT",
        "VVTI",
        "MULTIJET",
        "JTD",
        "JTDM",
        "CDTI",
        "D4D",
        "4MOTION",
        "ALLGRIP",
        "BVM",
        "BVM5",
        "BVM6",
        "BVA6",
        "BVA8",
        "CVT",
        "EAT",
        "DCT",
        "TIPTRONIC",
        "STEPTRONIC",
        "ZE",
        "Z E",
        "ENERGY",
        "ELEGANCE",
        "EXECUTIVE",
        "EQUILIBRE",
    }
)
# Stage 3: body styles; J.3 (body) is separate evidence and radar photos are mostly front or rear views.
BODY_WORDS = frozenset(
    {
        "ESTATE",
        "BREAK",
        "SW",
        "SPORTWAGON",
        "SPORTSWAGON",
        "SPORTS TOURER",
        "TOURER",
        "VARIANT",
        "AVANT",
        "TOURING",
        "GRANDTOUR",
        "GRAND TOUR",
        "COMBI",
        "KOMBI",
        "SHOOTING BRAKE",
        "BERLINE",
        "HATCHBACK",
        "SEDAN",
        "SALOON",
        "LIMOUSINE",
        "SPORTBACK",
        "COUPE",
        "CABRIOLET",
        "CABRIO",
        "CC",
        "3 PORTES",
        "5 PORTES",
        "3P",
        "5P",
        "SOCIETE",
        "AFFAIRE",
        "AFFAIRES",
        "CONVERTIBLE",
        "DECOUVRABLE",
        "ROADSTER",
        "WAGON",
        "HB",
        "LIFTBACK",
        "FASTBACK",
        "VAN",
        "CARGO VAN",
        "PASSENGER VAN",
        "MINIVAN",
        "MONOSPACE",
        "FOURGON",
        "FOURGONNETTE",
        "PICKUP",
        "PICK UP",
        "SUV",
        "CAB",
        "REGULAR CAB",
        "CREW CAB",
        "EXTENDED CAB",
        "CLUB CAB",
        "QUAD CAB",
        "KING CAB",
        "DOUBLE CAB",
        "SUPERCAB",
        "SUPERCREW",
        "2 PORTES",
        "4 PORTES",
        "2P",
        "4P",
        "3 P",
        "5 P",
        "BRK",
        "CPE",
        "BERL",
        "COMBISPACE",
    }
)
# Phrases that name a different vehicle although their words are strippable (BMW 2 Active Tourer ≠ 2 coupé).
PROTECTED_PHRASES = frozenset({"ACTIVE TOURER", "GRAN TOURER", "GRAND TOURER", "GRAN COUPE"})
# A word that names a class and the token after it form one token ("CLASSE E", "MODEL X", "SERIE 3").
CLASS_WORDS = frozenset({"CLASSE", "SERIE", "MODEL", "TYPE"})

_Rules = tuple[tuple["re.Pattern[str]", str], ...]


def _rules(*pairs: tuple[str, str]) -> _Rules:
    return tuple((re.compile(pattern), repl) for pattern, repl in pairs)


# Make-specific rewrites of the normalised model, applied to registry and label spellings alike.
# The first pattern that matches rewrites the head of the string; the rest is kept.
MAKE_RULES: dict[str, _Rules] = {
    "MERCEDES": _rules(
        (r"^(?:CLASSE|CLASS|KLASSE) ([A-Z]{1,3})(?: ?\d{2,3}[A-Z]{0,2})?\b", r"CLASSE \1"),  # CLASSE A 180
        (r"^([A-Z]{1,3}) (?:CLASSE|CLASS|KLASSE)\b", r"CLASSE \1"),  # A-KLASSE, A CLASS
        (r"^([A-Z]{1,3}) ?\d{2,3}[A-Z]{0,2}\b", r"CLASSE \1"),  # A 180 D, C220, GLC 300 E
        (r"^([A-Z]{1,3})$", r"CLASSE \1"),  # a bare class code: G, GLA, SLK
    ),
    "BMW": _rules(
        (r"^(?:SERIE|SERIES|REIHE) (\d)\b", r"SERIE \1"),
        (r"^(\d) ?(?:ER|SERIE|SERIES|REIHE)\b", r"SERIE \1"),  # 3ER, 3 SERIES
        (r"^(\d)\d\d(?: ?[A-Z]{1,2})?\b", r"SERIE \1"),  # 320D, 118 I
    ),
}

_NON_ALNUM = re.compile(r"[^A-Z0-9]+")
_APOSTROPHES = frozenset("'\u2019\u2018`\u00b4")
_DISPLACEMENT = re.compile(r"(?<![\d.,])\d[.,]\d{1,2}(?: ?L)?(?![\d.,])", re.IGNORECASE)  # 1.5, 2.0L
_KWH = re.compile(r"(?<![\d.,])\d{1,3}(?:[.,]\d)? ?KWH\b", re.IGNORECASE)  # 52KWH, 22 kWh, 52.5 kWh
_GLUED_GENERATION = re.compile(r"\b([A-Z]{4,})([2-9])\b")  # MEGANE3 → MEGANE 3 (never DS3, C3, RAV4)
_PHASE = re.compile(r"\b(?:PHASE|PH) ?(?:[1-4]|I{1,3}|IV)\b|\bMK ?(?:\d|[IVX]{1,4})\b")
_SHORT_CODE = re.compile(
    r"\b(?!(?:SW|CC|HB|3P|5P)\b)([A-Z]{1,2}|RAV) (\d{1,2})\b"
)  # DS 3 → DS3, X 5 → X5, RAV 4 → RAV4
_DS_MODEL = re.compile(r"^DS ?\d")
_MULTI_ROMAN = frozenset({"II", "III", "IV", "VI", "VII", "VIII", "IX"})
_SINGLE_ROMAN = frozenset({"I", "V", "X"})
_ARABIC_GENERATION = frozenset("23456789")
_PHRASES = frozenset(p for p in (*TRIM_WORDS, *BODY_WORDS, *PROTECTED_PHRASES) if " " in p)
_MAX_PHRASE = max(len(p.split()) for p in _PHRASES)


def norm_text(text: str) -> str:
    """Upper case, no accents, no apostrophes (``CEE'D`` → ``CEED``), words separated by one space."""
    decomposed = unicodedata.normalize("NFKD", text)
    ascii_only = "".join(c for c in decomposed if not unicodedata.combining(c) and c not in _APOSTROPHES)
    return _NON_ALNUM.sub(" ", ascii_only.upper()).strip()


def norm_model(text: str) -> str:
    """:func:`norm_text` of a model, without engine displacements (``1.5``) and battery capacities (``52 kWh``)."""
    return norm_text(_KWH.sub(" ", _DISPLACEMENT.sub(" ", text)))


def norm_make(make: str) -> str:
    """The canonical make key of a make spelling (``Mercedes-Benz`` → ``MERCEDES``, ``V.W.`` → ``VOLKSWAGEN``).

    Letters spelt one by one with dots or dashes (``V.W.``, ``B-M-W``) are one word.
    """
    key = norm_text(make)
    words = key.split()
    if len(words) > 1 and all(len(w) == 1 for w in words):
        key = "".join(words)
    return MAKE_ALIASES.get(key, key)


def split_make(make_key: str, model: str) -> tuple[str, str]:
    """DS is its own make: a ``CITROEN DS3`` registration belongs to make ``DS``."""
    if make_key == "CITROEN" and _DS_MODEL.match(model):
        return "DS", model
    return make_key, model


def canonical_model(make_key: str, model: str) -> str:
    """The canonical form of a normalised model: make rules applied, nothing stripped."""
    text = _SHORT_CODE.sub(r"\1\2", " ".join(_PHASE.sub(" ", _GLUED_GENERATION.sub(r"\1 \2", model)).split()))
    text = _drop_make_prefix(make_key, text)
    for pattern, repl in MAKE_RULES.get(make_key, ()):
        text, n = pattern.subn(repl, text, count=1)
        if n:
            break
    return " ".join(_SHORT_CODE.sub(r"\1\2", text).split())


def _drop_make_prefix(make_key: str, text: str) -> str:
    """``MAZDA 3``/``MAZDA3`` → ``3``, ``RENAULT CLIO`` → ``CLIO``; a bare make or ``DS3`` stays."""
    for prefix in (make_key, *(alias for alias, key in MAKE_ALIASES.items() if key == make_key)):
        if text.startswith(prefix + " "):
            return text[len(prefix) + 1 :]
        if len(prefix) >= 4 and text.startswith(prefix) and text[len(prefix) :].isdigit():
            return text[len(prefix) :]
    return text


def _tokens(text: str) -> list[str]:
    """Words, with known phrases and "CLASSE x"-style pairs merged into one token."""
    words, out, i = text.split(), [], 0
    while i < len(words):
        size = next((n for n in range(_MAX_PHRASE, 1, -1) if " ".join(words[i : i + n]) in _PHRASES), 1)
        if size == 1 and words[i] in CLASS_WORDS and i + 1 < len(words):
            size = 2
        out.append(" ".join(words[i : i + size]))
        i += size
    return out


def _is_generation(tokens: Sequence[str], i: int) -> bool:
    """A generation marker: NOUVELLE/NEW anywhere, II..IX after anything, I/V/X or 2..9 after a word."""
    token = tokens[i]
    if i == 0:
        return token in GENERATION_WORDS and len(tokens) > 1
    if token in GENERATION_WORDS or token in _MULTI_ROMAN:
        return True
    prev = tokens[i - 1]  # merged tokens ("CLASSE X", "MODEL 3") hold a space, so are not isalpha()
    return prev.isalpha() and len(prev) >= 3 and (token in _SINGLE_ROMAN or token in _ARABIC_GENERATION)


def _strip(tokens: list[str], drop: Iterable[int]) -> list[str]:
    gone = set(drop)
    kept = [t for i, t in enumerate(tokens) if i not in gone]
    return kept or tokens


def _strip_generation(tokens: list[str]) -> list[str]:
    return _strip(tokens, (i for i in range(len(tokens)) if _is_generation(tokens, i)))


def _strip_words(words: frozenset[str]) -> Callable[[list[str]], list[str]]:
    return lambda tokens: _strip(tokens, (i for i, t in enumerate(tokens) if t in words))


def strip_candidates(canonical: str) -> list[str]:
    """The canonical model, then the same with generation, trim/powertrain and body words removed (cumulative).

    Then the same three strips with body words first (``SCENIC SW 3``: the generation follows a body
    word), so that a least-stripped form that names a label is always tried first.
    """
    tokens = _tokens(canonical)
    stages = [tokens]
    for strip in (_strip_generation, _strip_words(TRIM_WORDS), _strip_words(BODY_WORDS)):
        stages.append(strip(stages[-1]))
    body_first = tokens
    for strip in (_strip_words(BODY_WORDS), _strip_generation, _strip_words(TRIM_WORDS)):
        body_first = strip(body_first)
        stages.append(body_first)
    out: list[str] = []
    for stage in stages:
        text = " ".join(stage)
        if text and text not in out:
            out.append(text)
    return out


def _identity(text: str) -> frozenset[str]:
    return frozenset(t for t in text.split() if len(t) <= 3 or any(c.isdigit() for c in t))


def fuzzy_score(a: str, b: str) -> float:
    """rapidfuzz token_sort_ratio (0..100), or 0 when the identity tokens differ (``208`` vs ``2008``)."""
    if _identity(a) != _identity(b):
        return 0.0
    return float(fuzz.token_sort_ratio(a, b))


@dataclass(frozen=True)
class Resolution:
    """How a registry make/model mapped onto the taxonomy. ``index`` is None when unsupported.

    ``score`` is 100 for exact/alias/rule, the fuzzy score for fuzzy, and the best (rejected) fuzzy
    score for none. ``normalised`` is the "MAKE MODEL" text that matched, or the last one tried.
    ``make`` is the canonical make key ("" when the make string was empty).
    ``indices`` are every label the registered model counts for (its label group, or the groups a
    stripped spelling names: ``GOLF`` → ``GOLF HATCHBACK 1991`` and ``2012``); ``index`` is the first.
    ``group`` names that group ("MAKE MODEL"). Both derive from the match, so equality ignores them.
    """

    index: int | None
    method: Method
    score: float
    normalised: str
    make: str = ""
    indices: tuple[int, ...] = field(default=(), compare=False)
    group: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "method": self.method,
            "score": round(self.score, 2),
            "normalised": self.normalised,
            "group": self.group or None,
            "labels": list(self.indices),
        }


def _best(query: str, choices: Sequence[tuple[str, int]]) -> tuple[float, int | None]:
    """Best fuzzy score and its label; the label is None when two labels tie for the best score."""
    best, winners = 0.0, set()
    for key, index in choices:
        score = fuzzy_score(query, key)
        if score > best:
            best, winners = score, {index}
        elif score == best and score > 0:
            winners.add(index)
    return best, (next(iter(winners)) if len(winners) == 1 else None)


_YEAR = re.compile(r"^(.*\S) (?:19[5-9]\d|20[0-4]\d)$")


def _without_year(model: str) -> str:
    """``GOLF HATCHBACK 2012`` → ``GOLF HATCHBACK``: a model year never tells registry models apart."""
    match = _YEAR.match(model)
    return match.group(1) if match else model


class Taxonomy:
    """Lookup tables built once from a bundle's labels; resolutions are cached (LRU).

    Labels form *groups*, each one registry make/model: the labels sharing a ``group`` value
    (labels.csv), or, without one, the labels whose model differs only by a trailing model year.
    A registered model resolves to a group and ``p_model`` is the group's mass. A spelling (model,
    alias, group name) that names two groups raises :class:`TaxonomyError`.
    ``lookalike_groups`` (label names "MAKE MODEL", across makes) are badge twins: inside one, a
    difference is never a make-level flag (see iaflash.agent.decision.verdict).
    ``full_range_makes`` are makes whose whole range the bundle declares it covers: an unseen model
    of such a make may still be checked at make level. ``min_score`` is the fuzzy acceptance score
    (config ``registry.fuzzy_min_score``).
    """

    def __init__(
        self,
        labels: Sequence[Label],
        full_range_makes: Iterable[str] = frozenset(),
        min_score: float = DEFAULT_MIN_SCORE,
        lookalike_groups: Iterable[Sequence[str]] = (),
    ) -> None:
        if not 0 <= min_score <= 100:
            raise ValueError(f"min_score must be within 0..100, got {min_score}; fix registry.fuzzy_min_score")
        self.labels = tuple(labels)
        self.min_score = float(min_score)
        self.full_range_makes = frozenset(norm_make(m) for m in full_range_makes)
        self.other_indices = tuple(i for i, lb in enumerate(self.labels) if norm_make(lb.make) in OTHER_MAKES)
        self._make_of: dict[int, str] = {}
        self._by_make: dict[str, list[int]] = {}
        self._group_of: dict[int, tuple[str, str]] = {}
        self._members: dict[tuple[str, str], list[int]] = {}
        self._plain: dict[tuple[str, str], tuple[int, Method]] = {}
        self._canon: dict[tuple[str, str], int] = {}
        self._derived: dict[tuple[str, str], list[int]] = {}
        self._choices: dict[str, list[tuple[str, int]]] = {}
        for i, label in enumerate(self.labels):
            if i not in self.other_indices:
                self._add(i, label)
        for key, members in self._members.items():
            for stripped in strip_candidates(canonical_model(key[0], key[1]))[1:]:
                self._derived.setdefault((key[0], stripped), []).append(members[0])
        self.lookalike_groups = self._lookalikes(lookalike_groups)
        keys = list(self._members)
        self._group_ids = np.array(
            [keys.index(self._group_of[i]) if i in self._group_of else len(keys) + i for i in range(len(self.labels))]
        )
        self._cached = lru_cache(maxsize=CACHE_SIZE)(self._resolve)

    @classmethod
    def from_bundle(cls, bundle: Bundle, min_score: float = DEFAULT_MIN_SCORE) -> Taxonomy:
        """The taxonomy of a bundle: its labels, full-range makes and look-alike groups."""
        m = bundle.manifest
        return cls(bundle.labels, m.full_range_makes, min_score, m.lookalike_groups)

    def _lookalikes(self, groups: Iterable[Sequence[str]]) -> tuple[frozenset[int], ...]:
        by_name = {label.name: i for i, label in enumerate(self.labels)}
        out = []
        for group in groups:
            unknown = [name for name in group if name not in by_name]
            if unknown:
                raise TaxonomyError(
                    f"look-alike group {list(group)} names {unknown[0]!r}, no label; fix: spell labels 'MAKE MODEL'"
                )
            out.append(frozenset(by_name[name] for name in group))
        return tuple(out)

    def _claim(self, other: int, key: tuple[str, str], index: int, text: str) -> None:
        """``key`` (already naming label ``other``) is a spelling of ``index``: refused across groups."""
        if self._group_of.get(other) != self._group_of[index]:
            raise TaxonomyError(
                f"labels.csv: {text!r} (label {index}, {self.labels[index].name!r}) reads as {key[0]} {key[1]!r}, "
                f"which already names label {other} ({self.labels[other].name!r}) of another group; fix: remove the "
                "alias from one of them, or give both labels the same group"
            )

    def _add(self, index: int, label: Label) -> None:
        make, model = split_make(norm_make(label.make), norm_model(label.model))
        group = norm_model(label.group) if label.group else _without_year(model)
        self._make_of[index] = make
        self._by_make.setdefault(make, []).append(index)
        self._group_of[index] = (make, group)
        self._members.setdefault((make, group), []).append(index)
        spellings = [(label.model, "exact"), *((alias, "alias") for alias in label.aliases)]
        spellings += [(text, "exact") for text in {_without_year(model), group} - {model}]
        for text, method in spellings:
            key = split_make(norm_make(label.make), norm_model(text))
            if key[0] != make:  # an alias spelt with the other make's prefix (CITROEN "DS3") still counts
                key = (make, key[1])
            self._claim(self._plain.setdefault(key, (index, cast(Method, method)))[0], key, index, text)
            canon = canonical_model(make, key[1])
            self._claim(self._canon.setdefault((make, canon), index), (make, canon), index, text)
            self._choices.setdefault(make, []).append((canon, index))

    # -- public API ------------------------------------------------------------------------

    def resolve(self, make: str, model: str) -> int | None:
        """Index of the label for a registered make/model, or None if outside the taxonomy."""
        return self.resolve_detail(make, model).index

    def resolve_detail(self, make: str, model: str) -> Resolution:
        """The full :class:`Resolution` (index, group, method, score, normalised text, make key); cached."""
        return self._cached(make, model)

    def make_indices(self, make: str) -> tuple[int, ...]:
        """Indices of every label of this make (empty if the make is unknown)."""
        return tuple(self._by_make.get(norm_make(make), ()))

    def make_of(self, index: int) -> str:
        """The canonical make key of a label ("" for an 'other' class)."""
        return self._make_of.get(index, "")

    def group_indices(self, index: int) -> tuple[int, ...]:
        """Every label of the group of label ``index`` (itself alone for an 'other' class)."""
        key = self._group_of.get(index)
        return (index,) if key is None else tuple(self._members[key])

    def top1_mass(self, probs: np.ndarray) -> float:
        """The largest probability of one label group (a model split over its model years is sure of the model)."""
        return float(np.bincount(self._group_ids, weights=probs).max())

    def lookalikes(self, indices: Iterable[int]) -> tuple[int, ...]:
        """Labels of the look-alike groups holding any of ``indices``, other than ``indices`` themselves."""
        own = frozenset(indices)
        twins = frozenset().union(*(g for g in self.lookalike_groups if g & own)) - own
        return tuple(sorted(frozenset().union(*(self.group_indices(i) for i in twins)) - own)) if twins else ()

    def is_full_range(self, make_key: str) -> bool:
        """True when the bundle declares this make's whole range and has labels of it."""
        return make_key in self.full_range_makes and make_key in self._by_make

    def cache_info(self) -> tuple[int, int, int | None, int]:
        """(hits, misses, maxsize, currsize) of the resolution cache."""
        return self._cached.cache_info()

    # -- resolution --------------------------------------------------------------------------

    def _match_make(self, make_key: str) -> tuple[str | None, float]:
        if make_key in self._by_make:
            return make_key, 100.0
        score, winner = _best(make_key, [(m, n) for n, m in enumerate(self._by_make)])
        if winner is None or score < self.min_score:
            return None, score
        return list(self._by_make)[winner], score

    def _hit(self, index: int, method: Method, score: float, model: str, make_key: str) -> Resolution:
        """A resolution to ``index``'s group, widened by the groups ``model`` names once they are stripped."""
        text = f"{make_key} {model}"
        groups = [index, *self._derived.get((make_key, model), ())]
        indices = tuple(dict.fromkeys(i for g in groups for i in self.group_indices(g)))
        name = " ".join(self._group_of[index])
        if len(indices) > len(self.group_indices(index)):
            name = " | ".join(dict.fromkeys(" ".join(self._group_of[g]) for g in groups))
        return Resolution(index, method, score, text, make_key, indices, name)

    def _resolve(self, make: str, model: str) -> Resolution:
        raw_make, model_text = split_make(norm_make(make), norm_model(model))
        if raw_make in OTHER_MAKES:
            return Resolution(None, "none", 0.0, f"{raw_make} {model_text}".strip(), raw_make)
        make_key, make_score = self._match_make(raw_make)
        if make_key is None:
            return Resolution(None, "none", make_score, f"{raw_make} {model_text}".strip(), raw_make)
        fuzzy_make = make_score < 100

        plain = self._plain.get((make_key, model_text))
        if plain is not None:
            method: Method = "fuzzy" if fuzzy_make else plain[1]
            return self._hit(plain[0], method, make_score, model_text, make_key)
        stripped = strip_candidates(canonical_model(make_key, model_text)) or [model_text]
        # make rules again after stripping: GLC COUPE → GLC → CLASSE GLC
        candidates = list(dict.fromkeys(c for s in stripped for c in (s, canonical_model(make_key, s))))
        for candidate in candidates:
            index = self._canon.get((make_key, candidate))
            if index is None and (make_key, candidate) in self._derived:
                index = self._derived[(make_key, candidate)][0]
            if index is not None:
                method = "fuzzy" if fuzzy_make else "rule"
                return self._hit(index, method, make_score, candidate, make_key)
        return self._fuzzy_model(make_key, make_score, candidates)

    def _fuzzy_model(self, make_key: str, make_score: float, candidates: Sequence[str]) -> Resolution:
        best, winner, text = 0.0, None, candidates[-1]
        for candidate in candidates:
            score, index = _best(candidate, self._choices.get(make_key, []))
            if score > best:
                best, winner, text = score, index, candidate
        score = min(best, make_score)
        if winner is None or score < self.min_score:
            return Resolution(None, "none", score, f"{make_key} {text}".strip(), make_key)
        return self._hit(winner, "fuzzy", score, text, make_key)
