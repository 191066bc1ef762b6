"""Redaction: secret keys and credential-looking values are masked wherever args are shown."""

from __future__ import annotations

import copy
import importlib
import io
import json
import logging
import random
from typing import Any

import pytest
import structlog

from sudo_queue import redact
from sudo_queue.errors import PolicyError
from sudo_queue.logs import configure_logging
from sudo_queue.policy import Policy
from sudo_queue.redact import MASK, redact_text

# The module (the package's `redact` is the function).
redact_mod = importlib.import_module("sudo_queue.redact")

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
    "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
)
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAzV3x\nq8Tz0w==\n-----END RSA PRIVATE KEY-----"
)


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "Password",
        "db_password",
        "token",
        "githubToken",
        "secret",
        "client_secret",
        "api_key",
        "apiKey",
        "API-KEY",
        "x-api-key",
        "Authorization",
        "cookie",
        "Set-Cookie",
        "private_key",
        "privateKey",
        "aws_secret_access_key",
        "credentials",
    ],
)
def test_secret_keys_are_masked_case_and_separator_insensitively(key: str) -> None:
    """A value under a secret-looking key is masked, however the key is spelled."""
    assert redact({key: "s3cr3t-value", "amount": 5}) == {key: MASK, "amount": 5}


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"token is {JWT} ok", JWT),
        ("use sk-proj-abcdefghijklmnopqrstuvwx1234 here", "sk-proj-abcdefghijklmnopqrstuvwx1234"),
        ("stripe sk_live_abcdefghijklmnopqrstu1234", "sk_live_abcdefghijklmnopqrstu1234"),
        ("aws AKIAIOSFODNN7EXAMPLE key", "AKIAIOSFODNN7EXAMPLE"),
        ('curl -H "Authorization: Bearer abc123def456ghi"', "abc123def456ghi"),
        ("Bearer abc123def456ghi789", "abc123def456ghi789"),
        (f"key:\n{PEM}\nend", "MIIEowIBAAKCAQEAzV3x"),
        ("xoxb-123456789012-abcdefghijkl", "xoxb-123456789012-abcdefghijkl"),
        ("mysql --password=hunter2 -u root", "hunter2"),
        ('{"db_password": "hunter2"}', "hunter2"),
        ("https://api.example/v1?access_token=abc123&page=2", "abc123"),
        ("redis://:s3cret@cache:6379/0", "s3cret"),
        ("postgres://bob:pa55w0rd@db/prod", "pa55w0rd"),
    ],
)
def test_credential_looking_values_are_masked_in_text(text: str, secret: str) -> None:
    """Tokens, keys, PEM blocks and credentials in URLs are masked inside any string."""
    shown = redact({"cmd": text, "nested": [{"note": text}]})
    assert secret not in json.dumps(shown)
    assert MASK in shown["cmd"]
    assert MASK in shown["nested"][0]["note"]


@pytest.mark.parametrize(
    "text",
    [
        "bearer tokens are fine to talk about",
        "basic authentication is off",
        "the secret is out",
        "max_tokens: 512",
        "see https://example.com/a:b@c",
        "contact bob@example.com",
        "order 4111 shipped",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    """Plain prose and harmless values pass through unchanged."""
    assert redact_text(text) == text


def test_harmless_keys_and_values_are_kept() -> None:
    """Keys that merely contain a secret word as a prefix, and non-string values, stay."""
    args = {"max_tokens": 100, "author": "ann", "token_count": 3, "amount": 5000, "ok": True}
    assert redact(args) == args


def test_input_is_never_mutated_and_a_copy_is_returned() -> None:
    """redact returns a new structure and leaves the caller's object as it was."""
    args: dict[str, Any] = {
        "password": "hunter2",
        "items": [{"token": "t", "n": 1}, "sk-abcdefghijklmnopqrstuvwxyz"],
        "pair": ("AKIAIOSFODNN7EXAMPLE", 2),
    }
    before = copy.deepcopy(args)
    shown = redact(args)
    assert args == before
    assert shown is not args
    assert shown["items"] is not args["items"]
    assert shown == {
        "password": MASK,
        "items": [{"token": MASK, "n": 1}, MASK],
        "pair": (MASK, 2),
    }


def test_extra_keys_from_the_policy_are_masked_like_builtin_ones() -> None:
    """extra_keys adds names, compared the same case- and separator-insensitive way."""
    args = {"ssn": "123-45-6789", "cardNumber": "4111111111111111", "name": "ann"}
    shown = redact(args, extra_keys=["SSN", "card_number"])
    assert shown == {"ssn": MASK, "cardNumber": MASK, "name": "ann"}
    assert redact(args)["ssn"] == "123-45-6789"  # not a built-in secret key


def test_policy_file_redact_keys_are_loaded() -> None:
    """`redact: {keys: [...]}` in the policy file gives Policy.redact_keys."""
    policy = Policy.from_yaml("version: 1\nredact:\n  keys: [ssn, card_number]\nrules: []\n")
    assert policy.redact_keys == ("ssn", "card_number")
    assert "redact keys ssn, card_number" in policy.describe()


@pytest.mark.parametrize(
    "block", ["redact: [ssn]", "redact:\n  keyz: [ssn]", "redact:\n  keys: [1, '']"]
)
def test_policy_file_with_a_bad_redact_block_is_refused(block: str) -> None:
    """A malformed `redact` block is a PolicyError naming the line and the expected shape."""
    with pytest.raises(PolicyError, match=r"line 2: `redact(\.keys)?` must be"):
        Policy.from_yaml(f"version: 1\n{block}\n")


def test_log_lines_carry_no_secrets() -> None:
    """The logging set-up masks secrets in event fields and messages, ours and stdlib's."""
    out = io.StringIO()
    configure_logging("json", "debug", stream=out)
    try:
        structlog.get_logger("t").info(
            "call_made",
            password="hunter2",
            headers={"Authorization": "Bearer abc123def456ghi"},
            url="redis://:s3cret@cache:6379/0",
            note=f"jwt {JWT}",
        )
        logging.getLogger("some.library").warning("retrying with api_key=AKIAIOSFODNN7EXAMPLE")
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    text = out.getvalue()
    for secret in ("hunter2", "abc123def456ghi", "s3cret", JWT, "AKIAIOSFODNN7EXAMPLE"):
        assert secret not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0]["event"] == "call_made"
    assert lines[0]["password"] == MASK


def test_cyclic_log_values_do_not_crash_redaction() -> None:
    """A self-referencing value is masked below a depth limit instead of recursing forever."""
    loop: dict[str, Any] = {"name": "x"}
    loop["self"] = loop
    shown = redact({"event": "e", "value": loop})
    assert shown["value"]["name"] == "x"
    assert MASK in json.dumps(shown, default=str)


def test_the_one_scan_shortcut_never_skips_what_the_patterns_mask() -> None:
    """`redact_text` skips the eleven patterns when its one scan finds none of their literal
    parts. One credential of each kind, in any case, alone or amid harmless words: the
    shortcut's answer is always the patterns' own. (A trigger missing from the scan fails this.)"""
    secrets = [
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", JWT,
        "sk-proj-abcdefghijklmnopqrstuvwx", "rk_live_abcdefghijklmnopqrstuvwx",
        "AKIAIOSFODNN7EXAMPLE", "ASIAIOSFODNN7EXAMPLE", "ABIAIOSFODNN7EXAMPLE",
        "ACCAIOSFODNN7EXAMPLE", "xoxb-123456789012-abc", "ghp_" + "a" * 36, "gho_" + "b" * 36,
        "github_pat_" + "c" * 40, "AIza" + "d" * 35, "Authorization: Basic dXNlcjpwdw==",
        "proxy-authorization=xyz", "Bearer abc123def456ghi", "password=hunter2",
        "passwd: hunter2", "passphrase=hunter2", "pwd=hunter2", "secret=hunter2",
        "token=hunter2", "apikey=hunter2", "api_key=hunter2", "API-KEY: hunter2",
        "privatekey=hunter2", "private_key=hunter2", "access-key=hunter2", "cookie=hunter2",
        "postgres://bob:pa55w0rd@db/prod",
    ]  # fmt: skip
    fillers = ["reads are safe", "order 4111", " ", "\n", ", ", "=", ":", '"', "bob", "x" * 30]
    rng = random.Random(20261121)
    for secret in secrets:
        for variant in (secret, secret.lower(), secret.upper(), secret.swapcase()):
            assert redact_text(variant) == redact_mod._mask_values(variant), variant
        assert redact_text(secret) != secret, secret  # each is one the patterns mask
        for _ in range(200):
            words = [rng.choice(fillers) for _ in range(rng.randint(0, 4))]
            words.insert(rng.randint(0, len(words)), secret)
            text = "".join(w.swapcase() if rng.random() < 0.2 else w for w in words)
            assert redact_text(text) == redact_mod._mask_values(text), text


def test_non_ascii_text_always_goes_through_the_patterns() -> None:
    """Python's IGNORECASE pairs "s" with a long s (U+017F) and "i" with a dotless i (U+0131),
    which lower() does not: such text is never shortcut, so the patterns still mask it."""
    for text in ("\u017fecret=hunter2", "pr\u0131vate_key=hunter2", "caf\u00e9 token=hunter2"):
        assert redact_text(text) == redact_mod._mask_values(text)
        assert "hunter2" not in redact_text(text)
