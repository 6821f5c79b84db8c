"""Personal data scrubbing: emails, phone numbers, card numbers, IBANs and IP addresses.

Used on request logs and audit details by the server, and on corpora by
`semilla prepare --scrub-pii`. Card numbers must pass the Luhn check and IBANs the mod-97
check, so ordinary long numbers (dates, ids, token counts) are left alone.
"""

from __future__ import annotations

import ipaddress
import re

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
IPV6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")  # checked by ipaddress
# +34 612 345 678, (555) 123-4567, 612-345-678: 9 to 15 digits (dates have 8) with optional separators
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?![\w:])"
)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _card(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group())
    return "[CARD]" if 13 <= len(digits) <= 19 and luhn_ok(digits) else m.group()


def _ipv4(m: re.Match) -> str:
    try:
        ipaddress.IPv4Address(m.group())
    except ValueError:
        return m.group()
    return "[IP]"


def _ipv6(m: re.Match) -> str:
    try:
        ipaddress.IPv6Address(m.group())
    except ValueError:
        return m.group()
    return "[IP]"


def _phone(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group())
    return "[PHONE]" if 9 <= len(digits) <= 15 else m.group()


def scrub_pii(text: str) -> str:
    """`text` with personal data replaced by [EMAIL], [IBAN], [CARD], [IP] and [PHONE]."""
    text = EMAIL.sub("[EMAIL]", text)
    text = IBAN.sub(lambda m: "[IBAN]" if iban_ok(m.group()) else m.group(), text)
    text = CARD.sub(_card, text)
    text = IPV4.sub(_ipv4, text)
    text = IPV6.sub(_ipv6, text)
    return PHONE.sub(_phone, text)


def scrub_value(value):
    """scrub_pii over every string inside a JSON-like value (dicts, lists, strings)."""
    if isinstance(value, str):
        return scrub_pii(value)
    if isinstance(value, dict):
        return {k: scrub_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_value(v) for v in value]
    return value
