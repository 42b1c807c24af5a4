"""Redaction of secrets and personal data: one definition of each, used by the request log before
storage (`log.redact`) and by the fine-tune export."""

from __future__ import annotations

import collections
import ipaddress
import math
import re
from collections.abc import Callable

EMAIL, SECRET, PHONE, IP, CARD = "[EMAIL]", "[SECRET]", "[PHONE]", "[IP]", "[CARD]"
_PLACEHOLDERS = (EMAIL, SECRET, PHONE, IP, CARD)


def _entropy(s: str) -> float:
    counts = collections.Counter(s)
    return -sum(c / len(s) * math.log2(c / len(s)) for c in counts.values())


def _looks_random(body: str) -> bool:
    # A key's body mixes letters and digits in long runs; "tm-gateway-config" or "sk-learn" do not.
    if len(body) >= 32:
        return True
    return (len(body) >= 16 and any(c.isdigit() for c in body) and any(c.isalpha() for c in body)
            and max(len(p) for p in re.split(r"[-_]", body)) >= 8)


def _prefixed_key(m: re.Match) -> str:
    return SECRET if _looks_random(m.group("body")) else m.group(0)


def _auth_header(m: re.Match) -> str:
    # A credential has a digit or a capital inside it; "a basic understanding" or "Basic Authentication"
    # have neither.
    body = m.group("body")
    if any(c.isdigit() for c in body) or any(c.isupper() for c in body[1:]) or body.endswith("="):
        return f"{m.group('scheme')}{m.group('space')}{SECRET}"
    return m.group(0)


def _assigned_secret(m: re.Match) -> str:
    quote = m.group("quote")
    value = m.group("qvalue") if quote else m.group("uvalue")
    if value in _PLACEHOLDERS:
        return m.group(0)
    if quote:
        if len(value) < 4:
            return m.group(0)
    # Unquoted, only what looks like a literal: `password = input()` or `token: str` stay.
    elif "(" in value or not (any(c.isdigit() for c in value) and any(c.isalpha() for c in value)):
        return m.group(0)
    return f"{m.group('name')}{m.group('sep')}{quote or ''}{SECRET}{quote or ''}"


def _ip(m: re.Match) -> str:
    try:
        addr = ipaddress.ip_address(m.group(0))
    except ValueError:
        return m.group(0)
    if addr.version == 6 and len([g for g in m.group(0).split(":") if g]) < 3:
        return m.group(0)
    # Loopback, "any" and netmasks are configuration, not anyone's address.
    if addr.is_loopback or addr.is_unspecified or m.group(0).startswith("255."):
        return m.group(0)
    return IP


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group(0))
    # Card numbers start with 3-6; millisecond and nanosecond timestamps start with 1.
    if 13 <= len(digits) <= 19 and digits[0] in "3456" and _luhn(digits):
        return CARD
    return m.group(0)


def _phone(m: re.Match) -> str:
    return PHONE if len(re.sub(r"\D", "", m.group(0))) >= 9 else m.group(0)


def _high_entropy(m: re.Match) -> str:
    s = m.group(0)
    if not (any(c.isupper() for c in s) and any(c.islower() for c in s) and any(c.isdigit() for c in s)):
        return s
    # Long names are made of words: getUserProfileSettingsForAccountId2 has lowercase runs of 4 on
    # average; in random base62 they average 1.7 and stay under 3 in 99% of 32-character keys.
    runs = [len(r) for r in re.findall(r"[a-z]+", s)]
    return SECRET if _entropy(s) >= 3.5 and sum(runs) / len(runs) < 3.0 else s


_SECRET_NAME = (r"[A-Za-z0-9_.-]*?(?:api[_-]?key|secret(?:[_-]?key)?|token|passw(?:or)?d|pwd|passphrase"
                r"|access[_-]?key(?:[_-]?id)?|private[_-]?key|client[_-]?secret|credentials?)")

_LONG_RUN = re.compile(r"[A-Za-z0-9+_-]{32}")

# The two classes of pattern, in the order they run: whole blocks and prefixed keys first, then
# assignments (which skip values already replaced), then personal data, and the generic
# high-entropy rules last. (class, pattern, replacement, guard): the guard is a cheap necessary
# condition checked first (one of these substrings in the lowercased text, or a simple pattern),
# since most text holds no secret and some patterns cost 100 µs on a short prompt.
_Guard = tuple[str, ...] | re.Pattern | None
_REDACTIONS: list[tuple[str, re.Pattern, str | Callable[[re.Match], str], _Guard]] = [
    ("secret", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S), SECRET,
     ("private key",)),
    # user:password in a URL: postgres://app:s3cret@db.internal/app
    ("secret", re.compile(r"(?<=://)[^\s/:@\[\]]+:[^\s/@]+(?=@)"), SECRET, ("://",)),
    # JSON Web Tokens
    ("secret", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), SECRET, ("eyj",)),
    ("secret", re.compile(r"(?i)\b(?P<scheme>bearer|basic)(?P<space>\s+)(?P<body>[A-Za-z0-9._~+/-]{12,}=*)"),
     _auth_header, ("bearer", "basic")),
    # Keys with a vendor prefix: OpenAI, Anthropic, Token Machine, GitHub, Hugging Face, GitLab,
    # Slack, Stripe, npm, Google, AWS access key ids.
    ("secret", re.compile(r"(?<![\w-])(?:sk-ant-|sk-proj-|sk-|tm-|ghp_|gho_|ghu_|ghs_|ghr_|github_pat_|hf_|glpat-"
                          r"|xox[abposr]-|[spr]k_live_|[spr]k_test_|npm_)(?P<body>[A-Za-z0-9_-]+)"), _prefixed_key,
     ("sk-", "tm-", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "hf_", "glpat-", "xox", "k_live_",
      "k_test_", "npm_")),
    ("secret", re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"), SECRET, ("aiza",)),
    ("secret", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), SECRET, ("akia", "asia")),
    # name = "value" / name: value / "name": "value" where the name says secret
    ("secret", re.compile(rf"""(?ix)(?P<name>\b{_SECRET_NAME}["']?)(?P<sep>\s*[:=]\s*)
                     (?:(?P<quote>["'])(?P<qvalue>[^"'\n]*)(?P=quote)|(?P<uvalue>[^\s"',;]+))"""),
     _assigned_secret, ("key", "secret", "token", "passw", "pwd", "passphrase", "credential")),
    ("pii", re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), EMAIL,
     ("@",)),
    ("pii", re.compile(r"(?<![\w.-])\d(?:[ -]?\d){12,18}(?![\w-])"), _card, None),
    ("pii", re.compile(r"(?<![\w+.-])(?:\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{1,4}(?:[\s.-]?\d{2,4}){1,4}"
                       r"|\(\d{3}\)\s?\d{3}[\s.-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?![\w-]|\.\d)"), _phone, None),
    ("pii", re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)"), _ip, None),
    ("pii", re.compile(r"(?<![\w:.])(?=[0-9A-Fa-f:]*:[0-9A-Fa-f]*:)[0-9A-Fa-f:]{6,39}(?![\w:])"), _ip,
     (":",)),
    # Long hex (keys, signatures, commit ids alike: a commit id in stored text is no loss).
    ("secret", re.compile(r"(?<![\w-])(?=[0-9a-fA-F]*[a-fA-F])(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{32,}(?![\w-])"), SECRET,
     _LONG_RUN),
    # Long random-looking base64 / url-safe runs: upper, lower and digits, high entropy.
    ("secret", re.compile(r"(?<![\w+/-])[A-Za-z0-9+_-]{32,}={0,2}(?![\w+/-])"), _high_entropy, _LONG_RUN),
]
_SECRET_ONLY = [(p, r, g) for kind, p, r, g in _REDACTIONS if kind == "secret"]
_PII_ONLY = [(p, r, g) for kind, p, r, g in _REDACTIONS if kind == "pii"]
_ALL = [(p, r, g) for _, p, r, g in _REDACTIONS]


def redact(text: str, *, secrets: bool = True, pii: bool = True) -> str:
    """`text` with secrets and personal data replaced by placeholders. Secrets: [SECRET] (API keys,
    tokens, passwords, private keys, credentials in URLs, long hex or base64 secrets). Personal data
    (pii): [EMAIL], [PHONE], [IP], [CARD] (Luhn-valid card numbers). Ordinary code, numbers, dates,
    versions and loopback addresses stay as they are. Idempotent: redacting twice changes nothing more."""
    patterns = _ALL if secrets and pii else _SECRET_ONLY if secrets else _PII_ONLY if pii else ()
    low = text.lower()
    # A guard pattern's verdict holds until a substitution changes the text (two rules share _LONG_RUN).
    verdicts: dict[re.Pattern, bool] = {}
    for pattern, repl, guard in patterns:
        if guard is None:
            run = True
        elif isinstance(guard, re.Pattern):
            if guard not in verdicts:
                verdicts[guard] = guard.search(text) is not None
            run = verdicts[guard]
        else:
            run = False
            for g in guard:
                if g in low:
                    run = True
                    break
        if run:
            changed = pattern.sub(repl, text)
            if changed != text:
                text, low = changed, changed.lower()
                verdicts.clear()
    return text
