"""Policy loading, validation messages and evaluation (sudo_queue/policy.py)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sudo_queue.errors import PolicyError
from sudo_queue.policy import Evaluation, Policy, Rule, Verdict

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "policy.yaml"
SOURCE = "test-policy.yaml"


def policy(text: str) -> Policy:
    return Policy.from_yaml(textwrap.dedent(text), source=SOURCE)


def load_error(text: str) -> str:
    with pytest.raises(PolicyError) as caught:
        policy(text)
    return str(caught.value)


def evaluate(
    p: Policy,
    resource: str = "stripe",
    action: str = "charge",
    args: Any = None,
    *,
    agent: str = "billing-bot",
    context: dict[str, Any] | None = None,
) -> Evaluation:
    return p.evaluate(
        agent=agent,
        resource=resource,
        action=action,
        args={} if args is None else args,
        context=context or {},
    )


# Evaluation


def test_first_matching_rule_wins() -> None:
    """Of two rules that both match, the one written first decides."""
    p = policy(
        """
        version: 1
        rules:
          - name: first
            resource: stripe
            decision: deny
          - name: second
            resource: stripe
            decision: allow
        """
    )
    result = evaluate(p)
    assert (result.decision, result.rule) == (Verdict.DENY, "first")


@pytest.mark.parametrize(
    ("field", "glob", "hit", "miss"),
    [
        ("agent", "billing-*", "billing-bot", "support-bot"),
        ("resource", "db.*", "db.users", "dbx.users"),
        ("action", "re?d", "read", "reads"),
        ("action", "[rw]*", "write", "delete"),
        ("resource", "stripe", "stripe", "Stripe"),
    ],
)
def test_globs_match_agent_resource_and_action(field: str, glob: str, hit: str, miss: str) -> None:
    """Each of agent/resource/action is a case-sensitive glob over the whole name."""
    p = policy(
        f"""
        version: 1
        rules:
          - name: only
            {field}: "{glob}"
            decision: allow
        """
    )
    names = {"agent": "billing-bot", "resource": "stripe", "action": "charge"}
    assert p.evaluate(**{**names, field: hit}, args={}, context={}).rule == "only"
    assert p.evaluate(**{**names, field: miss}, args={}, context={}).rule == "default"


def test_all_three_globs_must_match() -> None:
    """A rule whose resource matches but whose action does not is skipped."""
    p = policy(
        """
        version: 1
        rules:
          - name: reads
            resource: "db.*"
            action: read
            decision: allow
        """
    )
    assert evaluate(p, "db.users", "read").decision is Verdict.ALLOW
    assert evaluate(p, "db.users", "write").rule == "default"


CHARGES = """
version: 1
rules:
  - name: small-charges
    resource: stripe
    action: charge
    when: "args.amount <= 50"
    decision: allow
  - name: big-charges
    resource: stripe
    action: charge
    decision: require_approval
"""


def test_when_true_matches_and_false_falls_through() -> None:
    """A true `when` lets its rule decide; a false one passes the request to the next rule."""
    p = policy(CHARGES)
    assert evaluate(p, args={"amount": 50}).rule == "small-charges"
    assert evaluate(p, args={"amount": 51}).rule == "big-charges"


def test_condition_sees_agent_resource_action_and_context() -> None:
    """`agent`, `resource`, `action` and `context` are in scope alongside `args`."""
    p = policy(
        """
        version: 1
        rules:
          - name: scoped
            when: >-
              agent == "billing-bot" && resource == "stripe" && action == "refund"
              && context.env == "staging"
            decision: allow
        """
    )
    assert evaluate(p, action="refund", context={"env": "staging"}).rule == "scoped"
    assert evaluate(p, action="refund", context={"env": "prod"}).rule == "default"


def test_condition_is_skipped_when_globs_do_not_match() -> None:
    """A rule whose globs miss never runs its condition, so its errors cannot deny."""
    p = policy(
        """
        version: 1
        default: allow
        rules:
          - name: needs-amount
            resource: stripe
            when: "args.amount > 0"
            decision: deny
        """
    )
    result = evaluate(p, "email", "send", {"to": "a@example.com"})
    assert (result.decision, result.rule, result.error) == (Verdict.ALLOW, "default", False)


@pytest.mark.parametrize("default", ["deny", "allow"])
def test_default_applies_when_nothing_matches(default: str) -> None:
    """With no matching rule the `default` decides, under the rule name "default"."""
    p = policy(f"version: 1\ndefault: {default}\nrules: []\n")
    result = evaluate(p)
    assert result == Evaluation(
        decision=Verdict(default),
        rule="default",
        reason=f"no rule matched; default is {default}",
    )


def test_default_is_deny_when_unset() -> None:
    """A policy without `default:` denies what no rule matches."""
    p = policy("version: 1\n")
    assert p.default is Verdict.DENY
    assert evaluate(p).decision is Verdict.DENY


def test_default_require_approval_uses_fifteen_minutes_and_anyone() -> None:
    """A require_approval default waits 15 minutes for one approval from anyone."""
    result = evaluate(policy("version: 1\ndefault: require_approval\n"))
    assert result.decision is Verdict.REQUIRE_APPROVAL
    assert (result.approvers, result.min_approvals, result.expires_in) == ((), 1, 900.0)


def test_require_approval_carries_approvers_quorum_expiry_channel_and_reason() -> None:
    """Everything a human-approval step needs comes back from the matching rule."""
    p = policy(
        """
        version: 1
        rules:
          - name: big-charges
            resource: stripe
            decision: require_approval
            approvers: ["U0123ABCD", "U0456EFGH", "@finance-leads"]
            min_approvals: 2
            expires_in: 1h30m
            channel: "#approvals-finance"
            reason: "charges need a human"
        """
    )
    assert evaluate(p) == Evaluation(
        decision=Verdict.REQUIRE_APPROVAL,
        rule="big-charges",
        reason="charges need a human",
        approvers=("U0123ABCD", "U0456EFGH", "@finance-leads"),
        min_approvals=2,
        expires_in=5400.0,
        channel="#approvals-finance",
    )


def test_rule_without_reason_gets_a_generated_one() -> None:
    """A rule with no `reason` explains itself as "matched rule X"."""
    p = policy("version: 1\nrules:\n  - name: ok\n    decision: allow\n")
    assert evaluate(p).reason == "matched rule 'ok'"


def test_missing_key_fails_closed_naming_the_rule() -> None:
    """A condition reading an absent key denies, names its rule and flags the error."""
    result = evaluate(policy(CHARGES), args={"currency": "usd"})
    assert result.decision is Verdict.DENY
    assert result.rule == "small-charges"
    assert result.error is True
    assert result.reason.startswith("rule 'small-charges': condition could not be evaluated (")
    assert "'amount'" in result.reason
    assert result.reason.endswith("; denied (fail closed)")


def test_has_guards_an_optional_key() -> None:
    """`has(args.x)` is false for an absent key instead of an error, as documented."""
    p = policy(
        """
        version: 1
        rules:
          - name: with-cc
            when: "has(args.cc) && size(args.cc) > 0"
            decision: require_approval
          - name: rest
            decision: allow
        """
    )
    assert evaluate(p, args={"to": "a@example.com"}).rule == "rest"
    assert evaluate(p, args={"cc": ["b@example.com"]}).rule == "with-cc"


@pytest.mark.parametrize("condition", ["args.amount", "'yes'", "null", "[true]"])
def test_non_bool_result_fails_closed(condition: str) -> None:
    """A condition that gives anything but true/false denies, naming the rule."""
    p = policy(
        f'version: 1\ndefault: allow\nrules:\n  - name: odd\n    when: "{condition}"\n'
        "    decision: allow\n"
    )
    result = evaluate(p, args={"amount": 10})
    assert (result.decision, result.rule, result.error) == (Verdict.DENY, "odd", True)
    assert "not a bool" in result.reason


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([1, 2], id="args-is-a-list"),
        pytest.param("amount", id="args-is-a-string"),
        pytest.param({"amount": "10"}, id="wrong-type"),
        pytest.param({"amount": object()}, id="not-representable-in-cel"),
    ],
)
def test_args_cel_cannot_use_fail_closed(args: Any) -> None:
    """Args a condition cannot read deny the request, naming the rule; evaluate never raises."""
    result = evaluate(policy(CHARGES), args=args)
    assert (result.decision, result.rule, result.error) == (Verdict.DENY, "small-charges", True)


def test_cyclic_or_very_deep_args_fail_closed_instead_of_crashing() -> None:
    """Nesting that would crash CEL's native converter is refused as a fail-closed deny."""
    cyclic: dict[str, Any] = {"amount": 1}
    cyclic["self"] = cyclic
    deep: dict[str, Any] = {"amount": 1}
    for _ in range(10_000):
        deep = {"amount": 1, "inner": deep}
    for args in (cyclic, deep):
        result = evaluate(policy(CHARGES), args=args)
        assert (result.decision, result.error) == (Verdict.DENY, True)
        assert "deeper than" in result.reason


@pytest.mark.parametrize("condition", ["args.amount / 0 == 1", "args.items[5] == 1"])
def test_runtime_errors_in_conditions_fail_closed(condition: str) -> None:
    """Division by zero, an index out of range and the like deny rather than raise."""
    p = policy(
        f'version: 1\ndefault: allow\nrules:\n  - name: risky\n    when: "{condition}"\n'
        "    decision: allow\n"
    )
    result = evaluate(p, args={"amount": 1, "items": [1]})
    assert (result.decision, result.rule, result.error) == (Verdict.DENY, "risky", True)


def test_non_string_names_fail_closed() -> None:
    """A caller passing a non-string agent gets a fail-closed deny, not a crash or a match."""
    p = policy(
        "version: 1\ndefault: allow\nrules:\n  - name: r\n    agent: bot\n    decision: allow\n"
    )
    not_a_name: Any = None
    result = p.evaluate(agent=not_a_name, resource="x", action="y", args={}, context={})
    assert (result.decision, result.error) == (Verdict.DENY, True)


# Loading errors: each names the file, the rule, the line and the problem.


def test_missing_file_is_named(tmp_path: Path) -> None:
    """Loading a path that does not exist says which path."""
    path = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError, match=re.escape(f"{path}: no such file")):
        Policy.load(path)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    """A path that cannot be read (here, a directory) is reported with the OS's reason."""
    with pytest.raises(PolicyError, match=re.escape(f"{tmp_path}: cannot be read")):
        Policy.load(tmp_path)


def test_non_utf8_file_is_rejected(tmp_path: Path) -> None:
    """A file that is not UTF-8 is named and refused."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes("version: 1\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(PolicyError, match="is not UTF-8"):
        Policy.load(path)


def test_invalid_yaml_reports_yamls_line_and_column() -> None:
    """A YAML syntax error carries the parser's own line and column."""
    message = load_error(
        """\
        version: 1
        rules:
          - name: a
             decision: allow
        """
    )
    assert message.startswith(f"{SOURCE}, line 4, column 14: invalid YAML: ")


def test_unsafe_yaml_tags_are_refused() -> None:
    """A python/object tag is an error: the file is read with the safe loader only."""
    message = load_error("version: 1\nrules: !!python/object/apply:os.system ['true']\n")
    assert f"{SOURCE}, line 2" in message
    assert "python/object/apply" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", f"{SOURCE}: the policy is empty"),
        ("- a\n- b\n", f"{SOURCE}, line 1: the top level is a list, but it must be a mapping"),
        ("rules: []\n", f"{SOURCE}: `version: 1` is missing"),
        ("version: 2\n", f"{SOURCE}, line 1: version 2 is not supported"),
        ("version: true\n", f"{SOURCE}, line 1: version True is not supported"),
        ('version: "1"\n', f"{SOURCE}, line 1: version '1' is not supported"),
        (
            "version: 1\nrule: []\n",
            f"{SOURCE}, line 2: unknown top-level key 'rule' (did you mean 'rules'?)",
        ),
        (
            "version: 1\ndefault: maybe\n",
            f"{SOURCE}, line 2: default 'maybe' is not one of allow, deny or require_approval",
        ),
        ("version: 1\nrules:\n  a: 1\n", f"{SOURCE}, line 3: `rules` is a mapping"),
        ("version: 1\nrules:\n  - hello\n", f"{SOURCE}, line 3: rule #1 is a str"),
    ],
)
def test_top_level_problems(text: str, expected: str) -> None:
    """Top-level mistakes name the file, the line where known, and the problem."""
    assert load_error(text).startswith(expected)


RULE_ERRORS = [
    pytest.param(
        """
        version: 1
        rules:
          - name: a
            decision: allow
          - name: charges
            resource: stripe
            decision: alow
        """,
        "line 8: rule 'charges': decision 'alow' is not one of allow, deny or require_approval",
        id="bad-decision",
    ),
    pytest.param(
        """
        version: 1
        rules:
          - name: charges
            decision: require_approval
            aprovers: [U1]
        """,
        "line 6: rule 'charges': unknown key 'aprovers' (did you mean 'approvers'?)",
        id="unknown-key",
    ),
    pytest.param(
        """
        version: 1
        rules:
          - name: a
            decision: allow
          - decision: deny
        """,
        "line 6: rule #2: `name` is missing",
        id="missing-name",
    ),
    pytest.param(
        """
        version: 1
        rules:
          - name: charges
            resource: stripe
        """,
        "line 4: rule 'charges': `decision` is missing",
        id="missing-decision",
    ),
    pytest.param(
        """
        version: 1
        rules:
          - name: charges
            decision: allow
          - name: charges
            decision: deny
        """,
        "line 6: rule 'charges': the name is already used by the rule at line 4",
        id="duplicate-name",
    ),
    pytest.param(
        """
        version: 1
        rules:
          - name: charges
            decision: require_approval
            expires_in: 15x
        """,
        "line 6: rule 'charges': expires_in '15x' is not a duration",
        id="bad-duration",
    ),
    pytest.param(
        """
        version: 1
        rules:
          - name: charges
            decision: require_approval
            expires_in: 31d
        """,
        "line 6: rule 'charges': expires_in '31d' is out of range",
        id="duration-over-30-days",
    ),
    pytest.param(
        """
        version: 1
        rules:
          - name: charges
            decision: allow
            when: "args.amount <="
        """,
        "line 6: rule 'charges': when 'args.amount <=' does not compile: column 15:",
        id="bad-cel",
    ),
    pytest.param(
        """
        version: 1
        rules:
          - name: charges
            decision: allow
            approvers: [U1]
        """,
        "line 4: rule 'charges': approvers only makes sense for require_approval rules, "
        "but this rule's decision is allow",
        id="approvers-on-allow",
    ),
    pytest.param(
        """
        version: 1
        rules:
          - name: charges
            decision: deny
            expires_in: 1h
            channel: "#x"
        """,
        "line 4: rule 'charges': expires_in, channel only make sense for require_approval",
        id="expiry-and-channel-on-deny",
    ),
    pytest.param(
        """
        version: 1
        rules:
          - name: charges
            decision: require_approval
            approvers: [U1, U2]
            min_approvals: 3
        """,
        "line 4: rule 'charges': min_approvals is 3 but only 2 approvers are listed",
        id="quorum-over-approvers",
    ),
    pytest.param(
        """
        version: 1
        rules:
          - name: charges
            decision: deny
            decision: allow
        """,
        "line 6: duplicate key 'decision' (first at line 5)",
        id="duplicate-yaml-key",
    ),
    pytest.param(
        """
        version: 1
        rules:
          - name: default
            decision: deny
        """,
        "line 4: rule 'default': name 'default' is reserved",
        id="reserved-name",
    ),
    pytest.param(
        """
        version: 1
        rules:
          - name: charges
            decision: require_approval
            min_approvals: true
        """,
        "line 6: rule 'charges': min_approvals: Input should be a valid integer",
        id="bool-is-not-a-count",
    ),
]


@pytest.mark.parametrize(("text", "expected"), RULE_ERRORS)
def test_rule_problems_name_file_rule_line_and_problem(text: str, expected: str) -> None:
    """Each rule mistake is reported as "<file>, line N: rule <name>: <problem>; <fix>"."""
    message = load_error(text)
    assert message.startswith(f"{SOURCE}, {expected}")
    assert ";" in message  # every message goes on to say what to do


def test_several_problems_are_reported_together() -> None:
    """All broken rules are listed at once, one line each, so one run finds them all."""
    message = load_error(
        """
        version: 1
        rules:
          - name: a
            decision: alow
          - name: b
            decision: deny
            approvers: [U1]
        """
    )
    lines = message.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{SOURCE}, line 5: rule 'a': decision 'alow'")
    assert lines[1].startswith(f"{SOURCE}, line 6: rule 'b': approvers only makes sense")


def test_group_handle_allows_quorum_beyond_listed_approvers() -> None:
    """With an @group among the approvers, min_approvals may exceed the number listed."""
    p = policy(
        """
        version: 1
        rules:
          - name: charges
            decision: require_approval
            approvers: ["U1", "@finance-leads"]
            min_approvals: 3
        """
    )
    assert evaluate(p).min_approvals == 3


def test_policy_load_reads_a_file_and_names_it_in_errors(tmp_path: Path) -> None:
    """`Policy.load` reports problems against the path it was given."""
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\nrules:\n  - name: x\n    decision: maybe\n")
    with pytest.raises(PolicyError, match=re.escape(f"{path}, line 4: rule 'x': decision")):
        Policy.load(path)


# Version


def test_version_is_a_content_hash_stable_for_equal_content(tmp_path: Path) -> None:
    """Equal bytes give the same version, whether loaded from a file or a string."""
    text = "version: 1\nrules:\n  - name: ok\n    decision: allow\n"
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    version = Policy.from_yaml(text).version
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", version)
    assert Policy.from_yaml(text).version == version
    assert Policy.load(path).version == version
    assert Policy.load(path).source == str(path)


def test_version_changes_when_content_changes() -> None:
    """Any edit, even a comment, gives a new version (what was evaluated is traceable)."""
    text = "version: 1\nrules:\n  - name: ok\n    decision: allow\n"
    assert Policy.from_yaml(text).version != Policy.from_yaml(text + "# note\n").version
    assert Policy.from_yaml(text).version != Policy.from_yaml(text.replace("allow", "deny")).version


# The example policy


@pytest.fixture(scope="module")
def example() -> Policy:
    return Policy.load(EXAMPLE)


@pytest.mark.parametrize(
    ("resource", "action", "args", "decision", "rule"),
    [
        ("stripe", "charge", {"amount": 10}, Verdict.ALLOW, "small-charges"),
        ("stripe", "charge", {"amount": 5000}, Verdict.REQUIRE_APPROVAL, "big-charges"),
        ("postgres", "drop_table", {"table": "users"}, Verdict.DENY, "never-drop"),
        ("db.users", "read", {"id": 1}, Verdict.ALLOW, "reads-are-safe"),
        ("db.users", "write", {"id": 1}, Verdict.DENY, "default"),
        ("email", "send", {"to": "bob@example.com"}, Verdict.ALLOW, "internal-email"),
        ("email", "send", {"to": "bob@rival.com"}, Verdict.REQUIRE_APPROVAL, "external-email"),
        (
            "email",
            "send",
            {"to": "eve@rival.com, bob@example.com"},
            Verdict.REQUIRE_APPROVAL,
            "external-email",
        ),
    ],
)
def test_example_policy_decides_the_design_examples(
    example: Policy,
    resource: str,
    action: str,
    args: dict[str, Any],
    decision: Verdict,
    rule: str,
) -> None:
    """config/policy.yaml loads and decides DESIGN.md's example calls as documented."""
    result = evaluate(example, resource, action, args)
    assert (result.decision, result.rule, result.error) == (decision, rule, False)


def test_example_big_charges_carry_approvers(example: Policy) -> None:
    """The example's big-charges rule asks the listed approvers, once, within 15 minutes."""
    result = evaluate(example, args={"amount": 5000})
    assert result.approvers == ("U0123ABCD", "@finance-leads")
    assert (result.min_approvals, result.expires_in) == (1, 900.0)
    assert result.reason == "charges above 50 need a human"


def test_describe_lists_version_default_and_every_rule(example: Policy) -> None:
    """`describe()` shows the version, the default and one line per rule with its details."""
    text = example.describe()
    assert example.version in text
    assert "default deny" in text
    lines = [line for line in text.splitlines() if re.match(r"\s+\d+\. ", line)]
    assert len(lines) == len(example.rules)
    big = next(line for line in lines if "big-charges" in line)
    for part in (
        "resource=stripe",
        "action=charge",
        "require_approval",
        "U0123ABCD, @finance-leads",
        "min_approvals: 1",
        "expires_in: 15m",
    ):
        assert part in big
    assert "when `args.amount <= 50`" in text


# Durations


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("90s", 90.0),
        ("1h30m", 5400.0),
        (45, 45.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1d2h3m4s", 93784.0),
        ("30d", 2592000.0),
        ("120", 120.0),
    ],
)
def test_durations_parse(written: str | int, seconds: float) -> None:
    """expires_in takes whole seconds or d/h/m/s durations and stores seconds."""
    rule = Rule.model_validate({"name": "r", "decision": "require_approval", "expires_in": written})
    assert rule.expires_in == seconds


@pytest.mark.parametrize(
    "written",
    ["15x", "", "1.5h", "-5", "m", "1m1h", "15 m", "15M", 0, -1, "0s", "31d", True, 1.5, None],
)
def test_bad_durations_are_rejected(written: object) -> None:
    """Anything but a positive whole duration of at most 30 days is refused."""
    with pytest.raises(ValidationError, match="expires_in"):
        Rule.model_validate({"name": "r", "decision": "require_approval", "expires_in": written})


def test_default_expiry_is_fifteen_minutes() -> None:
    """A require_approval rule without expires_in gives humans 15 minutes."""
    assert Rule(name="r", decision=Verdict.REQUIRE_APPROVAL).expires_in == 900.0


def test_overlong_condition_is_rejected() -> None:
    """A `when` over the length limit is refused at load (cel crashes on huge expressions)."""
    with pytest.raises(ValidationError, match="over the limit"):
        Rule.model_validate({"name": "r", "decision": "allow", "when": "true && " * 600 + "true"})
