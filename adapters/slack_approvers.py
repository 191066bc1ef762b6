"""Who may decide a request from Slack: user ids and user groups, resolved and cached.

A rule's `approvers` (or, if it names none, SUDO_QUEUE_SLACK_APPROVERS) lists Slack user ids
(`U0123ABCD`), user-group handles (`@finance-leads`) and user-group ids (`S0123ABCD`). Nobody
else decides. A group is resolved with `usergroups.list` (handle to id) and
`usergroups.users.list` (id to members), each cached for a TTL. When a lookup fails, the user is
not an approver through that group (fail closed) and the caller says so.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import structlog
from slack_sdk.errors import SlackApiError, SlackClientError

from .slack_config import GROUP_HANDLE, GROUP_ID, USER_ID

if TYPE_CHECKING:
    from collections.abc import Sequence

    from slack_sdk.web.async_client import AsyncWebClient

__all__ = ["ApproverCheck", "ApproverDirectory", "Verdict"]

log = structlog.get_logger(__name__)


class Verdict(StrEnum):
    APPROVER = "approver"
    NOT_APPROVER = "not_approver"
    UNKNOWN = "unknown"  # a group lookup failed and the user is not listed otherwise


@dataclass(frozen=True, slots=True)
class ApproverCheck:
    verdict: Verdict
    problem: str = ""


class ApproverDirectory:
    """Answers "may this Slack user decide a request with these approvers?"."""

    def __init__(
        self, client: AsyncWebClient, *, default: Sequence[str] = (), ttl_s: float = 60.0
    ) -> None:
        self._client = client
        self.default = tuple(default)
        self.ttl_s = ttl_s
        self._handles: tuple[float, dict[str, str]] | None = None
        self._members: dict[str, tuple[float, frozenset[str]]] = {}
        self._lookup = asyncio.Lock()

    def approvers_for(self, rule_approvers: Sequence[str]) -> tuple[str, ...]:
        """The rule's own approvers, or the app's default list when the rule names none."""
        return tuple(rule_approvers) or self.default

    async def check(self, user_id: str, rule_approvers: Sequence[str]) -> ApproverCheck:
        entries = self.approvers_for(rule_approvers)
        if user_id in entries:
            return ApproverCheck(Verdict.APPROVER)
        problems = []
        for entry in entries:
            if USER_ID.fullmatch(entry):
                continue
            try:
                members = await self._group(entry)
            except LookupError as exc:
                problems.append(str(exc))
                continue
            if user_id in members:
                return ApproverCheck(Verdict.APPROVER)
        if problems:
            log.warning("slack_approver_lookup_failed", user=user_id, problems=problems)
            return ApproverCheck(Verdict.UNKNOWN, "; ".join(problems))
        return ApproverCheck(Verdict.NOT_APPROVER)

    async def _group(self, entry: str) -> frozenset[str]:
        async with self._lookup:  # concurrent clicks share one lookup instead of each asking
            return await self._group_locked(entry)

    async def _group_locked(self, entry: str) -> frozenset[str]:
        if GROUP_HANDLE.fullmatch(entry):
            group_id = (await self._handle_ids()).get(entry[1:])
            if group_id is None:
                raise LookupError(f"no Slack user group with the handle {entry}")
        elif GROUP_ID.fullmatch(entry):
            group_id = entry
        else:
            raise LookupError(f"{entry!r} is neither a user id nor a user group")
        cached = self._members.get(group_id)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            reply = await self._client.usergroups_users_list(usergroup=group_id)
        except (SlackApiError, SlackClientError, OSError, TimeoutError) as exc:
            raise LookupError(f"cannot list the members of {entry} ({_why(exc)})") from exc
        members = frozenset(reply.get("users") or ())
        self._members[group_id] = (now + self.ttl_s, members)
        return members

    async def _handle_ids(self) -> dict[str, str]:
        now = time.monotonic()
        if self._handles is not None and self._handles[0] > now:
            return self._handles[1]
        try:
            reply = await self._client.usergroups_list()
        except (SlackApiError, SlackClientError, OSError, TimeoutError) as exc:
            raise LookupError(f"cannot list the user groups ({_why(exc)})") from exc
        handles = {
            str(group["handle"]): str(group["id"])
            for group in reply.get("usergroups") or ()
            if group.get("handle") and group.get("id")
        }
        self._handles = (now + self.ttl_s, handles)
        return handles


def _why(exc: BaseException) -> str:
    if isinstance(exc, SlackApiError):
        return str(exc.response.get("error") or exc.response.status_code)
    return type(exc).__name__
