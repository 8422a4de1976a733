"""The rule for names people choose: adapter names and tenants; a looser one for the label names of heads.

Rows name their adapter by it and keys bind to a tenant by it, and an empty one means none (proto3 cannot
tell an empty string from an unset field), so it must not be empty. Both are echoed in logs, metric labels
and CLI tables, so no control characters, no invisible ones (zero-width spaces and joiners, bidi overrides:
Unicode's "format" category, and line separators) and no surrounding spaces, since each would let one name
look like another; and a bounded length.
"""
import unicodedata

from engine.errors import InvalidRequest

MAX_NAME_CHARS = 256
# control, format (U+200B zero-width space, U+202E right-to-left override, ...), surrogate; line, paragraph separator
UNSEEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# Unicode's Default_Ignorable_Code_Point ranges (DerivedCoreProperties.txt), which render as nothing whatever their
# category: U+034F combining grapheme joiner, U+3164 Hangul filler, U+FE0F variation selector, ...; and U+2800,
# the braille blank, which is no space to str.strip
INVISIBLE_RANGES = ((0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
                    (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x2800, 0x2800),
                    (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8),
                    (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF))


def name_problem(name: object) -> str | None:
    """What breaks the rule in ``name`` (to follow "an adapter name", "a label" and the like), or None."""
    if not isinstance(name, str) or not name.strip():
        return f"must be a non-empty string, got {name!r}"
    if len(name) > MAX_NAME_CHARS:
        return f"holds at most {MAX_NAME_CHARS} characters, got {len(name)}"
    if name != name.strip() or any(_unseen(c) for c in name):
        return f"must not hold control characters, invisible ones or surrounding spaces, got {name!r}"
    return None


# Labels are text a head's author wrote in any script, not names that select something: zero-width joiners and
# non-joiners (emoji sequences, Persian and Indic words) and variation selectors and tag characters (the emoji form
# of U+2764, flag sequences) are part of it, between or after visible characters. Every other character the name
# rule calls unseen is refused (controls, zero-width spaces, bidi controls, fillers, separators), and a label needs
# a visible character: "" means "no label over 0.5" in multi-label replies, and an invisible one would pass for it.
JOINERS = frozenset("\u200c\u200d")
SELECTORS = ((0xFE00, 0xFE0F), (0xE0020, 0xE007F), (0xE0100, 0xE01EF))


def label_problem(label: object) -> str | None:
    """What breaks the rule for a head's label name (to follow "a label name"), or None."""
    if not isinstance(label, str) or not label:
        return f"must be a non-empty string, got {label!r}"
    if len(label) > MAX_NAME_CHARS:
        return f"holds at most {MAX_NAME_CHARS} characters, got {len(label)}"
    for i, c in enumerate(label):
        if c in JOINERS:
            allowed = 0 < i < len(label) - 1  # between two characters
        elif any(lo <= ord(c) <= hi for lo, hi in SELECTORS):
            allowed = i > 0  # after the character it selects a form of
        else:
            allowed = not _unseen(c)
        if not allowed:
            return (f"must not hold control characters or invisible ones but joiners and variation selectors "
                    f"after a visible character, got {label!r}")
    if label.isspace():
        return f"needs a visible character, got {label!r}"
    return None


def check_name(name: object, what: str = "an adapter name", field: str = "name") -> None:
    """Raises InvalidRequest (naming ``field``) unless ``name`` is a string that follows the rule."""
    problem = name_problem(name)
    if problem is not None:
        raise InvalidRequest(f"{what} {problem}", field)


def check_tenant(tenant: object, what: str = "a tenant") -> None:
    """A tenant is None (shared adapters, an operator's key) or a name; "" would be one that lists as shared."""
    if tenant is not None:
        check_name(tenant, what, "tenant")


def _unseen(c: str) -> bool:
    if c.isascii():
        return not c.isprintable()  # the common case, without a table lookup: only the controls are unseen
    code = ord(c)
    return unicodedata.category(c) in UNSEEN_CATEGORIES or any(lo <= code <= hi for lo, hi in INVISIBLE_RANGES)
