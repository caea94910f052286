"""PII scrubbing as FineWeb did it: e-mail addresses and public IP addresses are replaced.

Replacements are drawn from fixed lists (datatrove's), chosen by a hash of the match instead of at
random, so the same input always gives the same output. Private, loopback and documentation
addresses are left alone (they identify nobody). Out of scope: names, phone numbers, street
addresses; FineWeb did not remove them either.
"""

from __future__ import annotations

import ipaddress
import re
import zlib

EMAIL = re.compile(
    r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)"
)
IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|[01]?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|[01]?\d?\d)(?![\d.])")
EMAIL_REPLACEMENTS = ("email@example.com", "firstname.lastname@example.org")
IP_REPLACEMENTS = ("22.214.171.124", "126.96.36.199", "188.8.131.52", "184.108.40.206", "220.127.116.11")


def _pick(options: tuple[str, ...], key: str) -> str:
    return options[zlib.crc32(key.encode()) % len(options)]


def _is_public(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_global
    except ValueError:
        return False


def scrub(text: str) -> tuple[str, int, int]:
    """The text with e-mails and public IPv4 addresses replaced, and how many of each were."""
    n_email = n_ip = 0

    def email(m: re.Match[str]) -> str:
        nonlocal n_email
        n_email += 1
        return _pick(EMAIL_REPLACEMENTS, m.group(0))

    def ip(m: re.Match[str]) -> str:
        nonlocal n_ip
        if not _is_public(m.group(0)):
            return m.group(0)
        n_ip += 1
        return _pick(IP_REPLACEMENTS, m.group(0))

    text = EMAIL.sub(email, text)
    text = IPV4.sub(ip, text)
    return text, n_email, n_ip
