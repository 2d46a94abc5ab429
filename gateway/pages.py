"""Page sessions: what a page token continues.

The first paged Recommend ranks several pages at once and keeps the ranked list under a new
token; each next page takes the next items of that list, never one the token already served
and none the user has interacted with (or hidden) since. When the list runs out the funnel
ranks more, excluding everything the session has seen, so paging goes on until the funnel has
nothing new. Sessions live in the gateway that issued the token, for `ttl_s`, the least
recently used dropped beyond `max_sessions`: memory grows with open sessions times the pages
ranked ahead, not with users or items.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gateway.config import PagingConfig
from gateway.funnel import Recommendation
from gateway.validation import InvalidRequest

MAX_TOKEN_BYTES = 64


def request_fingerprint(*parts: bytes) -> bytes:
    """What a token is bound to beside its user: a page continues only the list of the same
    filter, context and exclusions."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.digest()


@dataclass
class PageSession:
    user_id: str
    fingerprint: bytes
    expires: float
    queued: deque[Recommendation] = field(default_factory=deque)  # ranked, not served yet
    served: set[str] = field(default_factory=set)
    exhausted: bool = False  # the funnel had nothing new to add
    model_version: str = ""
    filter_passed: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one page of a session at a time

    def seen(self) -> set[str]:
        return self.served | {r.item_id for r in self.queued}

    def extend(self, items: Iterable[Recommendation]) -> int:
        """Append newly ranked items the session has not seen; how many were new."""
        seen = self.seen()
        fresh = [r for r in items if r.item_id not in seen]
        self.queued.extend(fresh)
        if not fresh:
            self.exhausted = True
        return len(fresh)

    def take(self, count: int, drop: set[str]) -> list[Recommendation]:
        """Up to `count` queued items in ranked order, skipping (and discarding) `drop`."""
        page: list[Recommendation] = []
        while self.queued and len(page) < count:
            item = self.queued.popleft()
            if item.item_id not in drop and item.item_id not in self.served:
                page.append(item)
        self.served.update(r.item_id for r in page)
        return page

    @property
    def finished(self) -> bool:
        return self.exhausted and not self.queued


class PageSessions:
    def __init__(self, config: PagingConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self._sessions: OrderedDict[str, PageSession] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def _expire(self) -> None:
        now = self.clock()
        while self._sessions:
            token, oldest = next(iter(self._sessions.items()))
            if oldest.expires > now and len(self._sessions) <= self.config.max_sessions:
                break
            del self._sessions[token]

    def open(self, user_id: str, fingerprint: bytes) -> tuple[str, PageSession]:
        self._expire()
        token = secrets.token_urlsafe(24)
        session = PageSession(user_id, fingerprint, self.clock() + self.config.ttl_s)
        self._sessions[token] = session
        self._expire()  # beyond max_sessions the least recently used goes
        return token, session

    def resume(self, token: str, user_id: str, fingerprint: bytes) -> PageSession:
        """The token's session, its lifetime renewed; InvalidRequest when it is unknown, expired
        or was issued for another user or another request."""
        if len(token.encode("utf-8", errors="surrogatepass")) > MAX_TOKEN_BYTES:
            raise InvalidRequest(f"page_token is longer than {MAX_TOKEN_BYTES} bytes; pass the next_page_token "
                                 f"of the previous answer")
        self._expire()
        session = self._sessions.get(token)
        if session is None:
            raise InvalidRequest(f"page_token unknown or expired (tokens live {self.config.ttl_s:g} s unused, in the "
                                 f"gateway that issued them); start again without page_token")
        if session.user_id != user_id or session.fingerprint != fingerprint:
            raise InvalidRequest("page_token was issued for another user_id, filter, context or exclude list; "
                                 "send the same request with the token, or start again without page_token")
        session.expires = self.clock() + self.config.ttl_s
        self._sessions.move_to_end(token)
        return session

    def close(self, token: str) -> None:
        self._sessions.pop(token, None)
