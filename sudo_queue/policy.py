"""The policy: which tool calls run at once, which are refused, which wait for a human.

A policy is a YAML file (config/policy.yaml is a commented example)::

    version: 1
    default: deny              # what happens when no rule matches (deny unless set)
    rules:
      - name: small-charges
        resource: stripe       # globs (fnmatch, case-sensitive) on agent, resource, action
        action: charge
        when: "args.amount <= 50"
        decision: allow

Rules are tried in order and the first one that matches decides. A rule matches when its
`agent`, `resource` and `action` globs all match the request and its `when` condition, if it has
one, is true.

Conditions are CEL expressions (the `common-expression-language` package), compiled when the
policy loads, with `args`, `agent`, `resource`, `action` and `context` in scope. CEL treats a
missing key as an error, and an error in a condition denies the request (fail closed), so guard
optional keys with `has()`, which is false rather than an error when the key is absent::

    when: "has(args.cc) && size(args.cc) > 0"

CEL's `&&` and `||` absorb an error when the other side decides alone (`args.x > 1 || true` is
true), so a condition fails closed only when its result depends on the failing part.

A condition that errors, that gives something other than a bool, or that is handed a value CEL
cannot represent (an `args` that is not JSON-like) denies the request and names the rule, with
`Evaluation.error` set. `Policy.evaluate` never raises.

Loading never executes anything from the file: YAML is read with the safe loader only, and CEL
is a side-effect-free expression language, not Python.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

import cel
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import PolicyError
from .models import MAX_DEPTH

__all__ = ["Evaluation", "Policy", "Rule", "Verdict"]

DEFAULT_EXPIRES_IN = 15 * 60.0
MAX_EXPIRES_IN = 30 * 24 * 3600
# cel 0.10 crashes the process (not an exception) on expressions of tens of thousands of terms;
# a real condition is a line or two.
MAX_WHEN_LENGTH = 4096
_SCOPE = ("args", "agent", "resource", "action", "context")
_APPROVAL_ONLY = ("approvers", "min_approvals", "expires_in", "channel")
_TOP_LEVEL_KEYS = ("version", "default", "rules", "redact")
_SECONDS = re.compile(r"[0-9]+")
_DURATION = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?")
_DURATION_HINT = 'write whole seconds (90) or a duration such as "30s", "15m", "2h", "1d", "1h30m"'
_CEL_POSITION = re.compile(r"<input>:(\d+):(\d+): (.*)")
_VERDICTS = "allow, deny or require_approval"
_GLOB_HINT = 'write a glob as quoted text, e.g. "db.*"'
_FIELD_HINTS = {
    "name": "write the name as quoted text",
    "agent": _GLOB_HINT,
    "resource": _GLOB_HINT,
    "action": _GLOB_HINT,
    "when": "write the CEL condition as a quoted string",
    "approvers": 'list Slack user ids or @group handles, e.g. ["U0123ABCD", "@finance-leads"]',
    "min_approvals": "write a whole number, at least 1",
    "reason": "write the reason as quoted text",
    "channel": 'write the Slack channel as quoted text, e.g. "#approvals"',
}


class Verdict(StrEnum):
    """What the policy says about a request."""

    ALLOW = "allow"
    DENY = "deny"
    REQUIRE_APPROVAL = "require_approval"


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The policy's answer for one request, and why."""

    decision: Verdict
    rule: str
    """The matching rule's name, or "default" when no rule matched."""
    reason: str
    approvers: tuple[str, ...] = ()
    min_approvals: int = 1
    expires_in: float = DEFAULT_EXPIRES_IN
    """Seconds a human has to decide a require_approval request."""
    channel: str | None = None
    error: bool = False
    """True when this is a fail-closed deny caused by an evaluation error."""


def _parse_duration(value: object) -> float:
    """Seconds from an int (seconds) or a duration string such as "1h30m"."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a duration; {_DURATION_HINT}")
    if isinstance(value, int):
        seconds = value
    else:
        text = value.strip()
        match = _DURATION.fullmatch(text)
        if _SECONDS.fullmatch(text):
            seconds = int(text)
        elif text and match is not None:
            days, hours, minutes, secs = (int(part or 0) for part in match.groups())
            seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
        else:
            raise ValueError(f"{value!r} is not a duration; {_DURATION_HINT}")
    if not 0 < seconds <= MAX_EXPIRES_IN:
        raise ValueError(
            f"{value!r} is out of range; it must be more than 0 and at most 30 days (30d)"
        )
    return float(seconds)


def _format_duration(seconds: float) -> str:
    """The shortest "1d2h30m"-style spelling of a whole number of seconds."""
    rest = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def _cel_compile_problem(expression: str, exc: Exception) -> str:
    """cel's compile error reduced to one line with the position in the expression."""
    text = str(exc)
    found = _CEL_POSITION.search(text)
    if found is None:
        return text.splitlines()[0] if text else type(exc).__name__
    line, column, problem = found.groups()
    where = f"column {column}" if "\n" not in expression else f"line {line}, column {column}"
    return f"{where}: {problem}"


class Rule(BaseModel):
    """One policy rule, as written in the YAML file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    agent: str = "*"
    resource: str = "*"
    action: str = "*"
    when: str | None = None
    decision: Verdict
    approvers: list[str] = Field(default_factory=list)
    min_approvals: StrictInt = Field(default=1, ge=1)
    expires_in: Annotated[float, BeforeValidator(_parse_duration)] = DEFAULT_EXPIRES_IN
    reason: str | None = None
    channel: str | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty; give every rule a short unique name")
        if value == "default":
            raise ValueError(
                "'default' is reserved: it names the decision taken when no rule matches; "
                "choose another name"
            )
        return value

    @field_validator("agent", "resource", "action")
    @classmethod
    def _check_glob(cls, value: str) -> str:
        if not value:
            raise ValueError("is empty, which matches nothing; write '*' to match anything")
        return value

    @field_validator("when")
    @classmethod
    def _check_when(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("is empty; remove `when:` or write a CEL condition")
        if len(value) > MAX_WHEN_LENGTH:
            raise ValueError(
                f"is {len(value)} characters, over the limit of {MAX_WHEN_LENGTH}; "
                "split the logic over several rules"
            )
        # cel raises ValueError with the position; whatever it raises, the condition is unusable.
        try:
            cel.compile(value)
        except Exception as exc:
            raise ValueError(
                f"{value!r} does not compile: {_cel_compile_problem(value, exc)}; "
                "fix the CEL expression (https://github.com/google/cel-spec)"
            ) from None
        return value

    @field_validator("approvers")
    @classmethod
    def _check_approvers(cls, value: list[str]) -> list[str]:
        if any(not approver.strip() for approver in value):
            raise ValueError("has an empty entry; list Slack user ids or @group handles")
        seen: set[str] = set()
        for approver in value:
            if approver in seen:
                raise ValueError(f"lists {approver!r} twice; list each approver once")
            seen.add(approver)
        return value

    @field_validator("channel")
    @classmethod
    def _check_channel(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty; name a Slack channel or remove `channel:`")
        return value

    @model_validator(mode="after")
    def _check_approval_fields(self) -> Rule:
        if self.decision is not Verdict.REQUIRE_APPROVAL:
            misplaced = [field for field in _APPROVAL_ONLY if field in self.model_fields_set]
            if misplaced:
                listed = ", ".join(misplaced)
                verb = "make" if len(misplaced) > 1 else "makes"
                raise ValueError(
                    f"{listed} only {verb} sense for require_approval rules, but this rule's "
                    f"decision is {self.decision.value}; remove {listed} or set "
                    "`decision: require_approval`"
                )
        groups = any(approver.startswith("@") for approver in self.approvers)
        if self.approvers and not groups and self.min_approvals > len(self.approvers):
            raise ValueError(
                f"min_approvals is {self.min_approvals} but only {len(self.approvers)} "
                f"approver{'s are' if len(self.approvers) > 1 else ' is'} listed, so the "
                "request could never be approved; lower min_approvals, list more approvers, "
                "or add a group handle such as @finance-leads"
            )
        return self

    def describe(self) -> str:
        """One line for `sudo-queue policy check`."""
        line = f"{self.name}: agent={self.agent} resource={self.resource} action={self.action}"
        if self.when is not None:
            line += f" when `{' '.join(self.when.split())}`"
        line += f" -> {self.decision.value}"
        if self.decision is Verdict.REQUIRE_APPROVAL:
            approvers = ", ".join(self.approvers) or "anyone"
            line += (
                f" (approvers: {approvers}; min_approvals: {self.min_approvals}; "
                f"expires_in: {_format_duration(self.expires_in)}"
                + (f"; channel: {self.channel}" if self.channel else "")
                + ")"
            )
        return line


_Matcher = Callable[[str], object]


def _matcher(glob: str) -> _Matcher | None:
    """A predicate for one glob, or None when it matches everything (nothing to check)."""
    if glob == "*":
        return None
    if not any(special in glob for special in "*?["):
        return glob.__eq__
    return re.compile(fnmatch.translate(glob)).match


class _Compiled:
    """A rule ready for the hot path: predicates, CEL program, and its precomputed answer."""

    __slots__ = ("action", "agent", "name", "needs", "outcome", "program", "resource")

    def __init__(self, rule: Rule) -> None:
        self.name = rule.name
        self.agent = _matcher(rule.agent)
        self.resource = _matcher(rule.resource)
        self.action = _matcher(rule.action)
        self.program: Any = None if rule.when is None else cel.compile(rule.when)
        referenced = set(self.program.variables()) if self.program is not None else set()
        self.needs = tuple(name for name in _SCOPE if name in referenced)
        self.outcome = Evaluation(
            decision=rule.decision,
            rule=rule.name,
            reason=rule.reason or f"matched rule {rule.name!r}",
            approvers=tuple(rule.approvers),
            min_approvals=rule.min_approvals,
            expires_in=rule.expires_in,
            channel=rule.channel,
        )


def _check_depth(value: Any, what: str) -> None:
    """Refuse what would crash cel's converter, which recurses natively: deep nesting, cycles.

    The limit is the one requests are held to (models.MAX_DEPTH), so real requests never hit it.
    """
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"{what} nests deeper than {MAX_DEPTH} levels (or is cyclic)")
        if isinstance(node, dict | list | tuple):
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)


class _Scope:
    """The CEL variables of one evaluation, converted once and only when a condition uses them."""

    __slots__ = ("_bound", "_context", "_values")

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values
        self._context = cel.Context()
        self._bound: set[str] = set()

    def bind(self, names: tuple[str, ...]) -> Any:
        for name in names:
            if name not in self._bound:
                value = self._values[name]
                _check_depth(value, name)
                self._context.add_variable(name, value)
                self._bound.add(name)
        return self._context


def _short_error(exc: BaseException) -> str:
    """The first sentence of an evaluation error, for a reason a human reads in Slack."""
    if isinstance(exc, KeyError) and exc.args:
        return f"no key {exc.args[0]!r}; guard optional keys with has()"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    # cel's messages go on with general advice about CEL typing; the first sentence is the fact.
    text = text.split(". ", 1)[0].rstrip(".")[:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fail_closed(rule: str, problem: str) -> Evaluation:
    return Evaluation(
        decision=Verdict.DENY,
        rule=rule,
        reason=f"rule {rule!r}: condition could not be evaluated ({problem}); denied (fail closed)",
        error=True,
    )


class Policy:
    """A loaded policy. Build one with `Policy.load(path)` or `Policy.from_yaml(text)`."""

    __slots__ = ("_compiled", "_default", "default", "redact_keys", "rules", "source", "version")

    def __init__(
        self,
        *,
        source: str,
        version: str,
        default: Verdict,
        rules: Sequence[Rule],
        redact_keys: Sequence[str] = (),
    ) -> None:
        names: set[str] = set()
        for rule in rules:
            if rule.name in names:
                raise PolicyError(f"{source}: rule {rule.name!r} is defined twice; rename one")
            names.add(rule.name)
        self.source = source
        self.version = version
        self.default = default
        self.rules = tuple(rules)
        # Extra key names whose values sudo_queue.redact masks (beyond its built-in ones).
        self.redact_keys = tuple(redact_keys)
        self._compiled = tuple(_Compiled(rule) for rule in self.rules)
        reason = f"no rule matched; default is {default.value}"
        self._default = Evaluation(decision=default, rule="default", reason=reason)

    def __repr__(self) -> str:
        return (
            f"<Policy {self.source} {self.version}: {len(self.rules)} rules, "
            f"default {self.default.value}>"
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        """Read and validate a policy file; PolicyError says what is wrong and where."""
        source = os.fspath(path)
        try:
            with open(source, "rb") as file:
                raw = file.read()
        except FileNotFoundError:
            raise PolicyError(
                f"{source}: no such file; pass the path of a policy YAML file "
                "(config/policy.yaml in the repository is an example)"
            ) from None
        except OSError as exc:
            raise PolicyError(
                f"{source}: cannot be read ({exc.strerror or exc}); check the path and its "
                "permissions"
            ) from exc
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyError(
                f"{source}: is not UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8"
            ) from None
        return _parse(text, source=source, raw=raw)

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "<string>") -> Policy:
        """Validate a policy given as YAML text; PolicyError says what is wrong and where."""
        return _parse(text, source=source, raw=text.encode("utf-8", "surrogatepass"))

    def evaluate(
        self, *, agent: str, resource: str, action: str, args: Any, context: dict[str, Any]
    ) -> Evaluation:
        """Decide one request: the first matching rule's answer, or the default. Never raises."""
        if not (isinstance(agent, str) and isinstance(resource, str) and isinstance(action, str)):
            return Evaluation(
                decision=Verdict.DENY,
                rule="default",
                reason="agent, resource and action must be strings; denied (fail closed)",
                error=True,
            )
        scope: _Scope | None = None
        for rule in self._compiled:
            if rule.resource is not None and not rule.resource(resource):
                continue
            if rule.action is not None and not rule.action(action):
                continue
            if rule.agent is not None and not rule.agent(agent):
                continue
            if rule.program is None:
                return rule.outcome
            try:
                if scope is None:
                    scope = _Scope(
                        {
                            "args": args,
                            "agent": agent,
                            "resource": resource,
                            "action": action,
                            "context": context,
                        }
                    )
                result = rule.program.execute(scope.bind(rule.needs))
            except Exception as exc:  # any failure of a condition is a deny, never a crash
                return _fail_closed(rule.name, _short_error(exc))
            except BaseException as exc:
                # pyo3 surfaces a Rust panic inside cel as PanicException, a BaseException;
                # that is a failed condition too. KeyboardInterrupt and the like propagate.
                if type(exc).__name__ != "PanicException":
                    raise
                return _fail_closed(rule.name, _short_error(exc))
            if result is True:
                return rule.outcome
            if result is not False:
                shown = repr(result)
                shown = shown if len(shown) <= 40 else shown[:37] + "..."
                return _fail_closed(
                    rule.name, f"the condition gave {type(result).__name__} {shown}, not a bool"
                )
        return self._default

    def describe(self) -> str:
        """A human-readable listing, as `sudo-queue policy check FILE` prints it."""
        lines = [
            f"policy {self.source}",
            f"version {self.version}",
            f"default {self.default.value}",
            *([f"redact keys {', '.join(self.redact_keys)}"] if self.redact_keys else []),
            f"{len(self.rules)} rule{'' if len(self.rules) == 1 else 's'}, first match wins:",
        ]
        width = len(str(len(self.rules)))
        lines += [
            f"  {number:>{width}}. {rule.describe()}"
            for number, rule in enumerate(self.rules, start=1)
        ]
        return "\n".join(lines)


# Loading: YAML text -> composed nodes (for line numbers) -> plain data -> Rule models.


def _line(node: Node | None) -> int | None:
    return None if node is None or node.start_mark is None else node.start_mark.line + 1


def _where(source: str, line: int | None) -> str:
    return f"{source}, line {line}" if line is not None else source


def _key_nodes(mapping: MappingNode) -> dict[Any, Node]:
    """Each scalar key of a mapping -> its key node (whose line is what a human looks for)."""
    return {key.value: key for key, _ in mapping.value if isinstance(key, ScalarNode)}


def _duplicate_keys(node: Node, source: str) -> list[str]:
    """YAML silently keeps the last of two equal keys; in a policy that hides a mistake."""
    problems: list[str] = []
    stack = [node]
    seen_nodes: set[int] = set()
    while stack:
        current = stack.pop()
        if id(current) in seen_nodes:
            continue
        seen_nodes.add(id(current))
        if isinstance(current, MappingNode):
            first: dict[tuple[str, str], Node] = {}
            for key, value in current.value:
                if isinstance(key, ScalarNode) and key.value != "<<":
                    earlier = first.setdefault((key.tag, key.value), key)
                    if earlier is not key:
                        problems.append(
                            f"{_where(source, _line(key))}: duplicate key {key.value!r} (first "
                            f"at line {_line(earlier)}); YAML would silently keep only the last "
                            "one: remove one of them"
                        )
                stack += [key, value]
        elif isinstance(current, SequenceNode):
            stack += current.value
    return problems


def _compose(text: str, source: str) -> tuple[Node | None, Any]:
    """Parse with PyYAML's safe loader, keeping the node tree for line numbers."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        duplicates = _duplicate_keys(root, source)
        if duplicates:
            raise PolicyError("\n".join(duplicates))
        return root, loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        what = exc.problem or "cannot parse"
        if exc.context:
            what += f" ({exc.context})"
        if isinstance(exc, yaml.constructor.ConstructorError):
            fix = "a policy is plain data: remove the tag"
        else:
            fix = "fix the syntax (indentation, and quotes around values with ': ' or ' #')"
        raise PolicyError(f"{where}: invalid YAML: {what}; {fix}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return "empty" if value is None else f"a {type(value).__name__}"


def _rule_problem(error: ErrorDetails) -> tuple[Any, str]:
    """(the key a validation error is about, if it is in the file; the problem and a fix)."""
    loc = error["loc"]
    field = loc[0] if loc else None
    kind = error["type"]
    if kind == "missing":
        hint = {
            "name": "give every rule a unique `name:`",
            "decision": f"add `decision:` with {_VERDICTS}",
        }.get(str(field), "add it")
        return None, f"`{field}` is missing; {hint}"
    if kind in ("extra_forbidden", "invalid_key"):
        close = difflib.get_close_matches(str(field), list(Rule.model_fields), n=1)
        maybe = f" (did you mean {close[0]!r}?)" if close else ""
        return field, (
            f"unknown key {field!r}{maybe}; a rule's keys are {', '.join(Rule.model_fields)}"
        )
    if kind == "enum" and field == "decision":
        return field, f"decision {error['input']!r} is not one of {_VERDICTS}; use one of those"
    message = error["msg"].removeprefix("Value error, ")
    if field is None:
        return None, message
    path = ".".join(str(part) for part in loc)
    if kind == "value_error":
        return field, f"{path} {message}"
    hint = _FIELD_HINTS.get(str(field), "see config/policy.yaml for the expected form")
    return field, f"{path}: {message} (got {error['input']!r}); {hint}"


def _parse(text: str, *, source: str, raw: bytes) -> Policy:
    version = "sha256:" + hashlib.sha256(raw).hexdigest()[:16]
    root, data = _compose(text, source)
    if root is None:
        raise PolicyError(
            f"{source}: the policy is empty; it needs at least `version: 1` "
            "(config/policy.yaml in the repository is an example)"
        )
    if not isinstance(root, MappingNode) or not isinstance(data, dict):
        raise PolicyError(
            f"{_where(source, _line(root))}: the top level is {_kind(data)}, but it must be a "
            "mapping with `version: 1`, `default:` and `rules:`"
        )
    keys = _key_nodes(root)
    values = {key.value: value for key, value in root.value if isinstance(key, ScalarNode)}
    for key in data:
        if key not in _TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(str(key), _TOP_LEVEL_KEYS, n=1)
            maybe = f" (did you mean {close[0]!r}?)" if close else ""
            raise PolicyError(
                f"{_where(source, _line(keys.get(key)))}: unknown top-level key {key!r}{maybe}; "
                "the top level has only version, default, rules and redact"
            )
    if "version" not in data:
        raise PolicyError(f"{source}: `version: 1` is missing; add it as the first line")
    if type(data["version"]) is not int or data["version"] != 1:
        raise PolicyError(
            f"{_where(source, _line(values.get('version')))}: version {data['version']!r} is not "
            "supported; this sudo-queue reads `version: 1`"
        )
    default_value = data.get("default", Verdict.DENY.value)
    if default_value not in tuple(Verdict):
        raise PolicyError(
            f"{_where(source, _line(values.get('default')))}: default {default_value!r} is not "
            f"one of {_VERDICTS}; use one of those"
        )
    rule_items = data.get("rules")
    rules_node = values.get("rules")
    if rule_items is None:
        rule_items = []
    elif not isinstance(rule_items, list) or not isinstance(rules_node, SequenceNode):
        raise PolicyError(
            f"{_where(source, _line(rules_node))}: `rules` is {_kind(rule_items)}, but it must "
            "be a list of rules, each starting with `- name:`"
        )

    problems: list[str] = []
    rules: list[Rule] = []
    first_line: dict[str, int | None] = {}
    for number, item in enumerate(rule_items, start=1):
        node = rules_node.value[number - 1] if isinstance(rules_node, SequenceNode) else None
        line = _line(node)
        if not isinstance(item, dict) or not isinstance(node, MappingNode):
            problems.append(
                f"{_where(source, line)}: rule #{number} is {_kind(item)}, but each rule must be "
                "a mapping starting with `- name:`"
            )
            continue
        name = item.get("name")
        label = repr(name) if isinstance(name, str) and name.strip() else f"#{number}"
        try:
            rule = Rule.model_validate(item)
        except ValidationError as exc:
            rule_keys = _key_nodes(node)
            for error in exc.errors(include_url=False):
                key, problem = _rule_problem(error)
                key_line = _line(rule_keys.get(key)) if key is not None else None
                problems.append(f"{_where(source, key_line or line)}: rule {label}: {problem}")
            continue
        if rule.name in first_line:
            problems.append(
                f"{_where(source, line)}: rule {label}: the name is already used by the rule at "
                f"line {first_line[rule.name]}; rule names must be unique, rename one"
            )
            continue
        first_line[rule.name] = line
        rules.append(rule)
    if problems:
        raise PolicyError("\n".join(problems))
    return Policy(
        source=source,
        version=version,
        default=Verdict(default_value),
        rules=rules,
        redact_keys=_redact_keys(data.get("redact"), source, _line(keys.get("redact"))),
    )


def _redact_keys(value: object, source: str, line: int | None) -> tuple[str, ...]:
    """`redact: {keys: [...]}`: extra key names whose values are masked wherever args are shown."""
    if value is None:
        return ()
    hint = 'write it as `redact: {keys: ["ssn", "card_number"]}`'
    where = _where(source, line)
    if not isinstance(value, dict) or set(value) - {"keys"}:
        raise PolicyError(f"{where}: `redact` must be a mapping with only `keys`; {hint}")
    keys = value.get("keys") or []
    if not isinstance(keys, list) or not all(isinstance(k, str) and k.strip() for k in keys):
        raise PolicyError(f"{where}: `redact.keys` must be a list of non-empty key names; {hint}")
    return tuple(dict.fromkeys(k.strip() for k in keys))
