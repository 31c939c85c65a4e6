"""Redaction: personal data and secrets replaced by typed placeholders before anything is stored.

Pure Python (no Django): ``Redactor(extra_patterns, exempt_attributes)`` holds the compiled rules;
``Redactor.text`` redacts a string and ``Redactor.value`` every string in a JSON value. Which values
of a record are free text is the record's owner's to say (``apps.traces.records.redact``): this
module knows strings and JSON, no app's schema.

What is replaced, and by what:

========== =================================================================== ================
type       matches                                                             placeholder
========== =================================================================== ================
EMAIL      ``local@domain.tld``                                                ``[EMAIL]``
CARD       13-19 digits, spaces or dashes between, Luhn-valid                  ``[CARD]``
API_KEY    ``sk-…``, ``AKIA…``/``ASIA…``, ``ghp_…`` (and gho/ghu/ghs/ghr,       ``[API_KEY]``
           ``github_pat_``), Slack ``xox?-``, Google ``AIza…``, our ``cp_live_``
JWT        three base64url parts, the first two starting ``eyJ``               ``[JWT]``
BEARER     ``Bearer <token>`` (the word stays: ``Bearer [TOKEN]``)             ``[TOKEN]``
PHONE      ``+``/``00`` and 8-15 digits; or a national number of 9-11 digits   ``[PHONE]``
           in groups (``(555) 123-4567``, ``020 7946 0958``, ``030 901820``)
IP         IPv4 dotted quads; IPv6 (validated by ``ipaddress``)                ``[IP]``
========== =================================================================== ================

Dictionary *keys* are schema and are left alone; in a map of attributes (``exemptable``), values
under an exempt key (a project setting; ``fnmatch`` patterns such as ``http.client_ip`` or
``app.debug.*``) are kept.
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

BUILTIN_TYPES = ("EMAIL", "CARD", "API_KEY", "JWT", "BEARER", "PHONE", "IP")
PLACEHOLDERS = {"EMAIL": "[EMAIL]", "CARD": "[CARD]", "API_KEY": "[API_KEY]", "JWT": "[JWT]",
                "BEARER": "Bearer [TOKEN]", "PHONE": "[PHONE]", "IP": "[IP]"}
# A project's settings (validated here; the projects API's serializers read the same limits).
NAME_RE = re.compile(r"[A-Z][A-Z0-9_]{0,39}")  # an extra pattern's name; used with fullmatch
MAX_PATTERN_LEN = 500
MAX_EXTRA_PATTERNS = 50
MAX_EXEMPT_ATTRIBUTES = 200
MAX_EXEMPT_ATTRIBUTE_LEN = 200
# The shortest thing any built-in rule matches is an email like a@b.io (6 characters).
_MIN_LEN = 6

_END = r"(?!\w|[.,-]\d)"  # a number ends here: no letter or digit, nor a separator and more digits
# Order matters where matches could overlap: tokens before anything that could match inside them.
_BUILTIN = [
    ("BEARER", r"\b[Bb]earer[ \t]+[A-Za-z0-9._~+/=-]{8,}"),
    ("JWT", r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}"),
    ("API_KEY", r"\b(?:sk-(?:proj-|ant-(?:api\d\d-)?|live_|test_)?[A-Za-z0-9_-]{20,}"
                r"|(?:AKIA|ASIA)[0-9A-Z]{16}"
                r"|gh[pousr]_[A-Za-z0-9]{30,}"
                r"|github_pat_[A-Za-z0-9_]{30,}"
                r"|xox[abprs]-[A-Za-z0-9-]{10,}"
                r"|AIza[0-9A-Za-z_-]{35}"
                r"|cp_live_[A-Za-z0-9]{20,})"),
    # Each rule starts with a character class, so the engine skips to candidate characters; the
    # "start of a token" checks are look-behinds over the consumed first character.
    ("EMAIL", r"[A-Za-z0-9._%+-](?<![A-Za-z0-9._%+-].)[A-Za-z0-9._%+-]{0,63}(?:@|%40)"
              r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    ("CARD", r"[2-6](?<![\w.+-].)(?:[ -]?\d){12,18}" + _END),
    ("PHONE", r"[+(\d](?<![\w+./-].)(?:"
              r"(?<=\+)\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){1,5}[ .-]?\d{2,4}"  # +44 20 7946 0958
              r"|(?<=0)0\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){1,5}[ .-]?\d{2,4}"  # 0049 30 901820
              r"|(?<=\()\d{2,4}\)[ .-]?\d{3,4}[ .-]\d{3,4}"  # (415) 555-2671
              r"|(?<=\d)\d{1,3}[ .-]\d{3,4}[ .-]\d{3,4}"  # 415-555-2671, 020 7946 0958
              r"|(?<=0)\d(?:[ .]\d\d){4}"  # 06 12 34 56 78
              r"|(?<=0)\d{2,4}[ /-]\d{5,8})" + _END),  # 030 901820
    ("IP", r"\d(?<![\w.]\d)\d{0,2}(?:\.\d{1,3}){3}(?!\w|\.\d)"),
    ("IP6", r"[0-9A-Fa-f:](?<![\w:.].)[0-9A-Fa-f]{0,3}:(?:[0-9A-Fa-f]{0,4}:){1,6}[0-9A-Fa-f]{0,4}"
            r"(?:(?<=:)(?:\d{1,3}\.){3}\d{1,3})?(?![\w:.])"),
]


_JWT = re.compile(dict(_BUILTIN)["JWT"])
_PHONE = re.compile(dict(_BUILTIN)["PHONE"])
_KIND_OF = {pattern: ("IP" if name == "IP6" else name) for name, pattern in _BUILTIN}
_KEY_PREFIXES = ("sk-", "AKIA", "ASIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "xox", "AIza",
                 "cp_live_")
_DIGIT_RUN = re.compile(r"\d\d")
_KEY_PREFIX = re.compile("|".join(map(re.escape, _KEY_PREFIXES)))


def _triggers(v: str) -> tuple[bool, ...]:
    """For each built-in rule, in _BUILTIN order: could it match ``v``? Cheap substring tests, all in
    one call: most strings fire none and skip every regex. (A placeholder never fires a later rule's
    test, so testing the original string once is the same as testing it before each rule.)"""
    digits = _DIGIT_RUN.search(v) is not None
    return ("earer" in v, "eyJ" in v, _KEY_PREFIX.search(v) is not None, "@" in v or "%40" in v, digits, digits,
            "." in v, v.count(":") >= 2)


class PatternError(ValueError):
    """A project's extra pattern that cannot be used."""


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _phone_ok(text: str) -> bool:
    n = len(_digits(text))
    if text.startswith(("+", "00")):
        return 8 <= n <= 15
    return 9 <= n <= 11


def _ip_ok(text: str) -> bool:
    if ":" not in text:
        return all(int(octet) <= 255 for octet in text.split("."))
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    # "::", "::1", "a::b": valid, but too short to be anyone's address and common in code ("std::x").
    return "." in text or sum(1 for part in text.split(":") if part) >= 3


def validate_extra_patterns(patterns: Any) -> list[dict]:
    """Check a project's extra patterns: ``[{"name": "EMPLOYEE_ID", "pattern": "EMP-\\d{6}"}, …]``.

    Returns them cleaned; raises PatternError naming the one at fault.
    """
    if patterns in (None, ""):
        return []
    if not isinstance(patterns, list):
        raise PatternError("must be a list of {name, pattern} objects.")
    if len(patterns) > MAX_EXTRA_PATTERNS:
        raise PatternError(f"at most {MAX_EXTRA_PATTERNS} patterns.")
    out = []
    for i, item in enumerate(patterns):
        if not isinstance(item, dict) or set(item) - {"name", "pattern"}:
            raise PatternError(f"[{i}] must be an object with 'name' and 'pattern' only.")
        name, pattern = item.get("name"), item.get("pattern")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise PatternError(f"[{i}].name must be 1-40 upper-case letters, digits or '_' (e.g. EMPLOYEE_ID).")
        if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_LEN:
            raise PatternError(f"[{i}].pattern must be a regular expression of 1-{MAX_PATTERN_LEN} characters.")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise PatternError(f"[{i}].pattern is not a valid regular expression: {exc}.") from None
        if compiled.search(""):
            raise PatternError(f"[{i}].pattern matches the empty string.")
        out.append({"name": name, "pattern": pattern})
    return out


def validate_exempt_attributes(keys: Any) -> list[str]:
    if keys in (None, ""):
        return []
    if not isinstance(keys, list) or not all(isinstance(k, str) and 0 < len(k) <= MAX_EXEMPT_ATTRIBUTE_LEN
                                             for k in keys):
        raise PatternError("must be a list of attribute names (fnmatch patterns allowed), "
                           f"each 1-{MAX_EXEMPT_ATTRIBUTE_LEN} characters.")
    if len(keys) > MAX_EXEMPT_ATTRIBUTES:
        raise PatternError(f"at most {MAX_EXEMPT_ATTRIBUTES} exempt attributes.")
    return sorted(set(keys))


@dataclass
class Stats:
    """What one redactor replaced, by type (for logs and the benchmark)."""

    counts: dict[str, int]

    def add(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1


class Redactor:
    """Compiled rules for one project. Thread-safe (no mutable state but ``stats``)."""

    def __init__(self, extra_patterns: Iterable[dict] = (), exempt_attributes: Iterable[str] = (),
                 *, builtin: bool = True):
        self._rules = [re.compile(pattern) for _name, pattern in _BUILTIN] if builtin else []
        self._extra = [(p["name"], re.compile(p["pattern"])) for p in validate_extra_patterns(list(extra_patterns))]
        exempt = list(exempt_attributes)
        self._exact = frozenset(k for k in exempt if not any(c in k for c in "*?["))
        self._globs = [k for k in exempt if k not in self._exact]
        self.stats = Stats({})

    @property
    def active(self) -> bool:
        return bool(self._rules) or bool(self._extra)

    # -- text --------------------------------------------------------------------------------

    def _sub(self, match: re.Match) -> str:
        kind = _KIND_OF[match.re.pattern]
        text = match.group()
        if kind == "CARD":
            digits = _digits(text)
            if not _luhn(digits):
                # Not a card; it may still be a phone number written with separators.
                return self._as_phone(text)
        elif kind == "BEARER":
            token = text.split(None, 1)[1]
            if _JWT.fullmatch(token):
                self.stats.add("JWT")
                return text[: len(text) - len(token)] + PLACEHOLDERS["JWT"]
        elif kind == "PHONE":
            if not _phone_ok(text):
                return text
        elif kind == "IP":
            if not _ip_ok(text):
                return text
        self.stats.add(kind)
        return PLACEHOLDERS[kind]

    def _as_phone(self, text: str) -> str:
        if _PHONE.fullmatch(text) and _phone_ok(text):
            self.stats.add("PHONE")
            return PLACEHOLDERS["PHONE"]
        return text

    def text(self, value: str) -> str:
        if len(value) >= _MIN_LEN and self._rules:
            # One pass per type, each behind a cheap substring test: one regex alternating over every
            # type ran several times slower.
            for pattern, fired in zip(self._rules, _triggers(value), strict=True):
                if fired:
                    value = pattern.sub(self._sub, value)
        for name, pattern in self._extra:
            value, n = pattern.subn(f"[{name}]", value)
            if n:
                self.stats.counts[name] = self.stats.counts.get(name, 0) + n
        return value

    # -- JSON values ---------------------------------------------------------------------------

    def exempt(self, key: str) -> bool:
        return key in self._exact or any(fnmatchcase(key, g) for g in self._globs)

    def value(self, value: Any, *, exemptable: bool = False) -> Any:
        """Redact every string in a JSON value. ``exemptable``: a map of attributes, whose exempt
        keys keep their values."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            if exemptable:
                return {k: (v if self.exempt(k) else self.value(v)) for k, v in value.items()}
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v) for v in value]
        return value


def redact_text(text: str) -> str:
    """The built-in rules on one string (tests, the benchmark)."""
    return Redactor().text(text)


def detect(text: str) -> set[str]:
    """Which built-in types the text holds (the benchmark's classifier)."""
    redactor = Redactor()
    redactor.text(text)
    return set(redactor.stats.counts)
