"""French licence plates: normalisation (SIV and FNI) and HMAC plate keys.

The registry never stores a plate in clear: only ``HMAC-SHA256(plate key, normalised plate)``, where
the plate key is the one of the box's site or region (docs/REGISTRY.md#plate-keys-one-per-site-or-region).
Two spellings of the same plate must therefore normalise to the same canonical text, and
anything that is not a plausible French plate is refused with :class:`PlateError`.

Rules (see docs/REGISTRY.md for the reasoning):

* Input is ASCII only, at most 32 characters. Case is ignored. Spaces, dashes, dots and tabs are
  separators and are ignored wherever they appear.
* SIV (since 2009): 2 letters, 3 digits, 2 letters -> ``AB-123-CD``.
  Letters I, O and U are never issued; the block ``SS`` is never issued (either side);
  the number ``000`` is never issued. ``WW`` on the left (temporary registrations) is accepted.
* FNI (before 2009): 1-4 digits, 1-3 letters, a department -> ``1234-AB-75``.
  Departments: 01-95 except 20, 2A, 2B, 971-976. Digits are kept as written (leading zeros too).

Error messages never contain the plate (nor any part of it): only its length and the rule broken.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from iaflash.agent.errors import PlateError, RegistryError

__all__ = [
    "CONFUSABLE",
    "MIN_KEY_BYTES",
    "confusable_neighbours",
    "key_id",
    "load_hmac_key",
    "normalise_plate",
    "plate_key",
]

MIN_KEY_BYTES = 32
_MAX_RAW_LEN = 32
_SEPARATORS = str.maketrans("", "", " -.\t")
_SIV = re.compile(r"([A-Z]{2})([0-9]{3})([A-Z]{2})")
_FNI = re.compile(r"([0-9]{1,4})([A-Z]{1,3})(2A|2B|97[1-6]|[0-9]{2})")
_SIV_FORBIDDEN_LETTERS = frozenset("IOU")
_SIV_FORBIDDEN_BLOCKS = frozenset({"SS"})
_FORMATS = "SIV (2 letters, 3 digits, 2 letters) nor FNI (1-4 digits, 1-3 letters, department)"


def _refuse(raw: str, why: str) -> PlateError:
    # Only the length and the broken rule: never the plate or a fragment of it.
    return PlateError(f"plate read ({len(raw)} chars) {why}")


def _siv(raw: str, left: str, digits: str, right: str) -> str:
    if _SIV_FORBIDDEN_LETTERS.intersection(left + right):
        raise _refuse(raw, "has the SIV shape but uses a letter I, O or U, which SIV never issues")
    if left in _SIV_FORBIDDEN_BLOCKS or right in _SIV_FORBIDDEN_BLOCKS:
        raise _refuse(raw, "has the SIV shape but uses the letter block SS, which SIV never issues")
    if digits == "000":
        raise _refuse(raw, "has the SIV shape but number 000, which SIV never issues")
    return f"{left}-{digits}-{right}"


def _fni(raw: str, digits: str, letters: str, dept: str) -> str:
    if dept.isdigit() and len(dept) == 2 and not (1 <= int(dept) <= 95 and dept != "20"):
        raise _refuse(raw, "has the FNI shape but its department is not 01-95 (20 excluded), 2A, 2B or 971-976")
    return f"{digits}-{letters}-{dept}"


def normalise_plate(raw: str) -> str:
    """Return the canonical spelling of a French plate (``AB-123-CD`` or ``123-ABC-45``).

    Raises :class:`PlateError` (without the plate in its message) for anything else.
    """
    if not isinstance(raw, str) or not raw.isascii() or len(raw) > _MAX_RAW_LEN:
        size = len(raw) if isinstance(raw, str) else 0
        raise PlateError(f"plate read ({size} chars) is not ASCII text of at most {_MAX_RAW_LEN} chars")
    compact = raw.translate(_SEPARATORS).upper()
    siv = _SIV.fullmatch(compact)
    if siv is not None:
        return _siv(raw, *siv.groups())
    fni = _FNI.fullmatch(compact)
    if fni is not None:
        return _fni(raw, *fni.groups())
    raise _refuse(raw, f"matches neither {_FORMATS} format")


_CONFUSABLE_PAIRS = (
    "O0", "Q0", "D0", "U0", "I1", "L1", "T1", "B8", "S5", "Z2", "G6", "A4", "T7", "E3",  # letter / digit
    "OD", "OQ", "DQ", "CG", "EF", "PR", "MN", "KX", "UV", "IJ", "HN",  # letter / letter
    "17", "38", "56", "68", "08", "69",  # digit / digit
)  # fmt: skip
CONFUSABLE: dict[str, frozenset[str]] = {
    c: frozenset(o for pair in _CONFUSABLE_PAIRS if c in pair for o in pair if o != c)
    for c in sorted(set("".join(_CONFUSABLE_PAIRS)))
}
"""For each character, those a plate reader commonly confuses it with (O/0, I/1, B/8, S/5, Z/2, G/6, D/0, Q/0 ...)."""


def confusable_neighbours(plate: str) -> tuple[str, ...]:
    """Every valid normalised plate one confusable character away from ``plate`` (normalised first).

    Pure: the pipeline hashes these and looks them up, so that a plate probably misread by one
    character is never flagged when another registered plate fits the photo. Sorted, without ``plate``.
    Raises :class:`PlateError` when ``plate`` itself is not a valid plate.
    """
    canonical = normalise_plate(plate)
    compact = canonical.replace("-", "")
    out = set()
    for i, char in enumerate(compact):
        for other in CONFUSABLE.get(char, ()):
            try:
                out.add(normalise_plate(compact[:i] + other + compact[i + 1 :]))
            except PlateError:
                continue
    out.discard(canonical)
    return tuple(sorted(out))


def plate_key(hmac_key: bytes, plate: str) -> bytes:
    """HMAC-SHA256 of the normalised plate under the plate key of the box's site or region (32 bytes)."""
    return hmac.new(hmac_key, normalise_plate(plate).encode("ascii"), hashlib.sha256).digest()


def key_id(hmac_key: bytes) -> str:
    """First 16 hex characters of sha256(key): names the key without revealing it."""
    return hashlib.sha256(hmac_key).hexdigest()[:16]


def load_hmac_key(raw: bytes, expected_id: str | None = None) -> bytes:
    """Decode the key file's hex text into the key bytes (at least 32 bytes).

    ``expected_id`` is the key id the box's config names (``[registry] hmac_key_id``): a key with
    another id (another site's plate key) is refused. Raises :class:`RegistryError` (the registry
    cannot be used without its key) with a fix.
    """
    fix = (
        "fix: write at least 64 hex characters, e.g. "
        "`python -c 'import secrets; print(secrets.token_hex(32))' > KEYFILE`"
    )
    try:
        text = raw.decode("ascii").strip()
        key = bytes.fromhex(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RegistryError(f"HMAC key is not hex text ({len(raw)} bytes read); {fix}") from exc
    if len(key) < MIN_KEY_BYTES:
        raise RegistryError(f"HMAC key is {len(key)} bytes, at least {MIN_KEY_BYTES} are required; {fix}")
    if expected_id is not None and key_id(key) != expected_id:
        raise RegistryError(
            f"HMAC key has id {key_id(key)}, but the config names {expected_id} ([registry] hmac_key_id): "
            "this is another site's (or an old) plate key; fix: install this site's current key "
            "(central: iaflash-central registry keygen --key-dir DIR SCOPE prints its id) or correct hmac_key_id"
        )
    return key
