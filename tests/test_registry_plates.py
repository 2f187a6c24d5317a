"""Plate normalisation (SIV, FNI), HMAC plate keys and the key file."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iaflash.agent.errors import PlateError, RegistryError
from iaflash.agent.registry.plates import (
    CONFUSABLE,
    confusable_neighbours,
    key_id,
    load_hmac_key,
    normalise_plate,
    plate_key,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
SIV_LETTERS = "ABCDEFGHJKLMNPQRSTVWXYZ"  # no I, O, U


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("AB-123-CD", "AB-123-CD"),
        ("AB 123 CD", "AB-123-CD"),
        ("ab-123-cd", "AB-123-CD"),
        ("AB123CD", "AB-123-CD"),
        ("ab123cd", "AB-123-CD"),
        ("AB.123.CD", "AB-123-CD"),
        (" AB - 123 - CD ", "AB-123-CD"),
        ("Fg-007-Hz", "FG-007-HZ"),
        ("WW-456-KL", "WW-456-KL"),  # temporary registration
        ("1234 AB 75", "1234-AB-75"),
        ("123-ABC-45", "123-ABC-45"),
        ("123abc45", "123-ABC-45"),
        ("1 A 01", "1-A-01"),
        ("0123 XY 13", "0123-XY-13"),  # digits kept as written
        ("56 KL 2A", "56-KL-2A"),
        ("56 kl 2b", "56-KL-2B"),
        ("999.ZZZ.974", "999-ZZZ-974"),
        ("12AB971", "12-AB-971"),
        ("77 AA 95", "77-AA-95"),
    ],
)
def test_real_world_spellings_normalise_to_the_canonical_form(raw: str, canonical: str) -> None:
    assert normalise_plate(raw) == canonical


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "---",
        "garbage",
        "AB-123",
        "AB-1234-CD",
        "A-123-CD",
        "ABC-123-DE",
        "AB-12-CD",
        "AI-123-CD",
        "AB-123-CO",
        "UB-123-CD",  # I, O, U never issued in SIV
        "SS-123-CD",
        "AB-123-SS",  # SS never issued
        "AB-000-CD",  # number 000 never issued
        "123 AB 20",
        "123 AB 00",
        "123 AB 96",
        "123 AB 99",
        "123 AB 977",
        "123 AB 2C",
        "123 AB 970",
        "12345 AB 75",
        "123 ABCD 75",
        "123 75",
        "ABC 45",
        "AB-123-CÉ",
        "ＡＢ-123-CD",  # not ASCII
        "AB_123_CD",
        "AB/123/CD",  # not separators
        "AB-123-CD" * 4,  # too long
    ],
)
def test_non_plates_are_refused_without_echoing_the_input(raw: str) -> None:
    with pytest.raises(PlateError) as info:
        normalise_plate(raw)
    message = str(info.value)
    assert "plate read (" in message
    compact = raw.replace(" ", "").replace("-", "").replace(".", "").upper()
    if len(compact) >= 4:
        assert raw not in message
        assert compact not in message.upper().replace(" ", "").replace("-", "")


def test_refusal_says_which_rule_broke() -> None:
    with pytest.raises(PlateError, match="I, O or U"):
        normalise_plate("AI-123-CD")
    with pytest.raises(PlateError, match="department"):
        normalise_plate("123 AB 20")
    with pytest.raises(PlateError, match=r"\(7 chars\) matches neither SIV"):
        normalise_plate("ABCDEFG")


letters = st.text(SIV_LETTERS, min_size=2, max_size=2).filter(lambda s: s != "SS")
digits = st.integers(1, 999).map(lambda n: f"{n:03d}")
separators = st.sampled_from(["", " ", "-", ".", "  ", " - "])


@st.composite
def siv_spellings(draw: st.DrawFn) -> tuple[str, str]:
    """(canonical, a spelling with random separators and case)."""
    left, num, right = draw(letters), draw(digits), draw(letters)
    canonical = f"{left}-{num}-{right}"
    text = draw(separators) + left + draw(separators) + num + draw(separators) + right + draw(separators)
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return canonical, "".join(c.lower() if f else c for c, f in zip(text, flips, strict=True))


@given(siv_spellings())
def test_every_siv_spelling_normalises_to_its_canonical_form(case: tuple[str, str]) -> None:
    canonical, spelling = case
    assert normalise_plate(spelling) == canonical


@given(siv_spellings())
def test_normalise_is_idempotent(case: tuple[str, str]) -> None:
    once = normalise_plate(case[1])
    assert normalise_plate(once) == once


@given(
    st.integers(1, 9999),
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=3),
    st.sampled_from(["01", "13", "2A", "2B", "59", "75", "95", "971", "976"]),
    separators,
)
def test_fni_plates_normalise_and_are_idempotent(num: int, lets: str, dept: str, sep: str) -> None:
    once = normalise_plate(f"{num}{sep}{lets.lower()}{sep}{dept}")
    assert once == f"{num}-{lets}-{dept}"
    assert normalise_plate(once) == once


@given(siv_spellings(), siv_spellings())
def test_plate_key_is_equal_for_equivalent_spellings_and_differs_across_keys(
    a: tuple[str, str], b: tuple[str, str]
) -> None:
    assert plate_key(KEY_A, a[1]) == plate_key(KEY_A, a[0])
    assert plate_key(KEY_A, a[1]) != plate_key(KEY_B, a[1])
    assert (plate_key(KEY_A, a[1]) == plate_key(KEY_A, b[1])) == (a[0] == b[0])


@st.composite
def near_plates(draw: st.DrawFn) -> str:
    """Plate-shaped strings that break a rule: wrong block lengths, bad letters or departments."""
    num = draw(st.text("0123456789", min_size=1, max_size=6))
    lets = draw(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=0, max_size=5))
    tail = draw(st.text("0123456789", min_size=1, max_size=4))
    sep = draw(separators)
    shape = draw(st.sampled_from(["fni", "siv"]))
    return f"{num}{sep}{lets}{sep}{tail}" if shape == "fni" else f"{lets}{sep}{num}{sep}{lets}"


@given(near_plates())
def test_error_messages_never_contain_the_plate(raw: str) -> None:
    try:
        normalise_plate(raw)
    except PlateError as exc:
        compact = raw.replace(" ", "").replace("-", "").replace(".", "").upper()
        if len(compact) >= 3:  # shorter fragments ("1", "AB") are inevitably in any English sentence
            assert raw not in str(exc)
            assert compact not in str(exc).upper()


def test_plate_key_is_hmac_sha256_of_the_canonical_plate() -> None:
    expected = hmac.new(KEY_A, b"AB-123-CD", hashlib.sha256).digest()
    assert plate_key(KEY_A, "ab 123 cd") == expected
    assert len(expected) == 32


def test_plate_key_refuses_a_bad_plate() -> None:
    with pytest.raises(PlateError):
        plate_key(KEY_A, "not a plate")


def test_key_id_names_the_key_without_revealing_it() -> None:
    assert key_id(KEY_A) == hashlib.sha256(KEY_A).hexdigest()[:16]
    assert key_id(KEY_A) != key_id(KEY_B)
    assert KEY_A.hex()[:16] != key_id(KEY_A)


def test_load_hmac_key_decodes_hex_text_with_whitespace() -> None:
    assert load_hmac_key(KEY_A.hex().encode() + b"\n") == KEY_A
    assert load_hmac_key(KEY_A.hex().upper().encode()) == KEY_A


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"00" * 31, "31 bytes, at least 32"),
        (b"", "0 bytes"),
        (b"zz" * 32, "not hex"),
        (b"abc", "not hex"),
        (bytes([0xFF]) * 64, "not hex"),
    ],
)
def test_load_hmac_key_refuses_short_or_invalid_keys_with_a_fix(raw: bytes, why: str) -> None:
    with pytest.raises(RegistryError, match=why) as info:
        load_hmac_key(raw)
    assert "fix:" in str(info.value)


# ---------------------------------------------------------------- confusable neighbours (the misread check)


@pytest.mark.parametrize(
    ("plate", "neighbours"),
    [
        # SIV letters and digits keep their places: D↔Q (O is never issued), 1↔7, 3↔8, C↔G ...
        ("AB-123-CD", ("AB-123-CQ", "AB-123-GD", "AB-128-CD", "AB-723-CD")),
        # FNI: a digit read as a letter (4→A) moves the blocks and is still a valid plate
        ("1234-AB-75", ("123-AAB-75", "1234-AB-15", "1234-AB-76", "1284-AB-75", "7234-AB-75")),
    ],
)
def test_confusable_neighbours_are_the_valid_plates_one_character_away(plate: str, neighbours: tuple[str, ...]) -> None:
    assert confusable_neighbours(plate) == neighbours


@given(
    st.text(alphabet=SIV_LETTERS, min_size=2, max_size=2),
    st.integers(1, 999),
    st.text(alphabet=SIV_LETTERS, min_size=2, max_size=2),
)
def test_every_neighbour_is_valid_differs_by_one_confusable_character_and_is_symmetric(
    left: str, number: int, right: str
) -> None:
    if "SS" in (left, right):
        return
    plate = f"{left}-{number:03d}-{right}"
    for other in confusable_neighbours(plate):
        assert normalise_plate(other) == other != plate
        diff = [(a, b) for a, b in zip(plate, other, strict=True) if a != b]
        assert len(diff) == 1 and diff[0][1] in CONFUSABLE[diff[0][0]]
        assert plate in confusable_neighbours(other)


def test_confusable_neighbours_refuse_an_invalid_plate_without_revealing_it() -> None:
    with pytest.raises(PlateError) as info:
        confusable_neighbours("ZZZ-SECRET")
    assert "SECRET" not in str(info.value)
