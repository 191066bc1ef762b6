"""Mask secrets in tool-call arguments before a human or a file sees them.

One function, :func:`redact`, is used everywhere arguments are shown: Slack messages, logs, the
audit log and CLI output. It returns a redacted deep copy and never mutates its input. The args
digest that binds an approval to a call is always taken over the *unredacted* arguments.

A value is masked when its key looks secret (``password``, ``token``, ``api_key`` ...; compared
case- and separator-insensitively, so ``apiKey``, ``API-KEY`` and ``api_key`` are the same key) or
when the value itself looks like a credential (a JWT, an ``sk-...`` key, an AWS access key id, a
bearer token, a PEM block). Extra key patterns come from the policy file.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import Any

__all__ = ["MASK", "SECRET_KEYS", "normalize_key", "redact", "redact_event_dict", "redact_text"]

MASK = "[REDACTED]"

#: Key names (normalized: lower case, no separators) whose values are always masked. A key is
#: secret when its normalized form equals or ends with one of these, so ``db_password``,
#: ``x-api-key`` and ``githubToken`` match too.
SECRET_KEYS: tuple[str, ...] = (
    "password",
    "passwd",
    "passphrase",
    "pwd",
    "secret",
    "token",
    "apikey",
    "authorization",
    "auth",
    "cookie",
    "setcookie",
    "privatekey",
    "accesskey",
    "secretkey",
    "signingkey",
    "encryptionkey",
    "sshkey",
    "credential",
    "credentials",
    "sessionid",
)
# Deeper than any request (models.MAX_DEPTH is 64); a log event nested deeper, or cyclic, is
# masked below this depth rather than recursed into.
_MAX_DEPTH = 100

_SEPARATORS = re.compile(r"[\s_\-.]+")

_B64URL_CHAR = r"[A-Za-z0-9._~+/-]"

# Values that look like credentials, wherever they appear in a string: (pattern, replacement).
# Each pattern is linear-time (no nested quantifiers), so hostile input cannot make it crawl.
_VALUE_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # PEM blocks (private keys, certificates): the whole block, across lines.
    (
        re.compile(r"-----BEGIN [A-Z0-9 ]{1,64}-----.*?(?:-----END [A-Z0-9 ]{1,64}-----|\Z)", re.S),
        MASK,
    ),
    # JWT / JWS: base64url segments, the first two starting with "eyJ" (the JSON '{"').
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), MASK),
    # OpenAI / Anthropic / Stripe secret and restricted keys: sk-..., sk_live_..., rk_live_...
    (re.compile(r"\b(?:sk|rk)[-_][A-Za-z0-9_-]{20,}"), MASK),
    # AWS access key ids.
    (re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b"), MASK),
    # Slack, GitHub and Google API tokens.
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), MASK),
    (re.compile(r"\b(?:gh[pousr]|github_pat)_[A-Za-z0-9_]{30,}"), MASK),
    (re.compile(r"\bAIza[0-9A-Za-z_-]{35}"), MASK),
    # An Authorization header pasted into text: whatever follows it (scheme and credentials).
    (
        re.compile(
            r"(?i)\b((?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)"
            r"[^\s\"',;]+(?:[ \t]+[^\s\"',;]+)?"
        ),
        rf"\g<1>{MASK}",
    ),
    # "Bearer <token>" (a token has a digit; plain English words after "bearer" stay).
    (
        re.compile(rf"(?i)\b(bearer\s+)(?={_B64URL_CHAR}*[0-9]){_B64URL_CHAR}{{8,}}=*"),
        rf"\g<1>{MASK}",
    ),
    # password=..., db_password: ..., "api_key": "..." inside a command line, a query string, a
    # message or JSON text (a name ending in a secret word, then = or :, then the value).
    (
        re.compile(
            r"(?i)(?<![A-Za-z0-9])([A-Za-z0-9_.-]{0,40}?(?:password|passwd|passphrase|pwd|secret"
            r"|token|api[_-]?key|private[_-]?key|access[_-]?key|cookie)[\"']?\s*[=:]\s*)"
            r"(?:(\")[^\"]*\"|(')[^']*'|[^\s&,;\"'}]+)"
        ),
        rf"\g<1>\g<2>\g<3>{MASK}\g<2>\g<3>",  # a quoted value stays quoted
    ),
    # Credentials in a URL: scheme://user:password@host.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]{0,20}://[^\s:/@]*):[^\s/@]+@"), rf"\g<1>:{MASK}@"),
)


# Every value pattern above needs one of these in its match, compared without case: lower-cased
# ASCII text in which none occurs holds nothing the patterns would mask, and one scan replaces
# eleven. (Only ASCII: under IGNORECASE, Python's re also pairs "i" with a dotless i, U+0131,
# and "s" with a long s, U+017F, which lower() does not.) tests/test_redact.py holds the two
# lists together.
_TRIGGERS = re.compile(
    r"-----begin |eyj|[sr]k[-_]|a[ksb]ia|acca|xox[abposr]-|gh[pousr]_|github_pat_|aiza"
    r"|authorization|bearer|passw|passphrase|pwd|secret|token|api[_-]?key|private[_-]?key"
    r"|access[_-]?key|cookie|://"
)


def normalize_key(key: str) -> str:
    """Fold a key name for comparison: lower case, without ``_``, ``-``, ``.`` or spaces."""
    return _SEPARATORS.sub("", key).lower()


def _secret_key(key: str, patterns: tuple[str, ...]) -> bool:
    """Whether `key` names a secret. Args repeat the same few keys call after call: short ones
    are remembered (a bounded cache; a long key, rare, is not worth its memory)."""
    if len(key) > 64:
        return _names_secret(key, patterns)
    return _names_secret_cached(key, patterns)


def _names_secret(key: str, patterns: tuple[str, ...]) -> bool:
    norm = normalize_key(key)
    return bool(norm) and norm.endswith(patterns)  # (equal to one is ending with it)


_names_secret_cached = functools.lru_cache(maxsize=4096)(_names_secret)


def redact_text(text: str) -> str:
    """Mask every credential-looking substring of ``text``; the rest is kept."""
    if text.isascii() and _TRIGGERS.search(text.lower()) is None:
        return text
    return _mask_values(text)


def _mask_values(text: str) -> str:
    for pattern, replacement in _VALUE_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _key_patterns(extra_keys: Iterable[str]) -> tuple[str, ...]:
    if not extra_keys:
        return SECRET_KEYS
    return _with_extra(tuple(extra_keys))


@functools.lru_cache(maxsize=64)  # (the policy's few patterns, one set per policy version)
def _with_extra(extra_keys: tuple[str, ...]) -> tuple[str, ...]:
    return SECRET_KEYS + tuple(n for n in (normalize_key(k) for k in extra_keys) if n)


def _redact(value: Any, patterns: tuple[str, ...], depth: int = 0) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if depth > _MAX_DEPTH and isinstance(value, (Mapping, list, tuple, set, frozenset)):
        return MASK
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for k, v in value.items():
            if isinstance(k, str) and _secret_key(k, patterns) and v is not None:
                out[k] = MASK
            else:
                out[k] = _redact(v, patterns, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        items = [_redact(v, patterns, depth + 1) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, (set, frozenset)):
        return [_redact(v, patterns, depth + 1) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return redact_text(bytes(value).decode("utf-8", "replace"))
    return value


def redact(value: Any, *, extra_keys: Sequence[str] = ()) -> Any:
    """Return a deep copy of ``value`` with secrets replaced by ``"[REDACTED]"``.

    ``value`` may be any JSON-like structure (dicts, lists, tuples, strings, numbers). The input is
    never mutated. ``extra_keys`` adds key names to mask (e.g. from the policy file's
    ``redact.keys``), compared the same case- and separator-insensitive way as the built-in ones.
    """
    return _redact(value, _key_patterns(extra_keys))


def redact_event_dict(
    logger: object, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: the event dict with secrets masked (keys and values alike)."""
    redacted: MutableMapping[str, Any] = _redact(event_dict, SECRET_KEYS)
    return redacted
