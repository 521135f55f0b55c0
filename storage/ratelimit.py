"""Per-key rate limits in Redis: requests and tokens per minute, batch lines per day.

Requests and tokens are two token buckets per key (one Redis hash,
`ferry:ratelimit:{<key id>}`): each holds up to its per-minute limit and refills
continuously at limit/60 per second, as OpenAI describes its own limits ("replenished
continuously"). A bucket rather than a sliding window because settlement must be able to
give tokens back (`give_back`: add them, capped at the limit), which a log of past
requests cannot do simply; and a bucket's state is three numbers whatever the rate. A
bucket left alone for 60 seconds is full, so the hash expires 60 s after its last change
and an idle key costs nothing (a missing hash reads as full buckets). Batch lines count
per UTC day in a counter of their own (`...:lines:<yyyymmdd>`, expiring after two days).

Every check is ONE Lua script (`EVALSHA`, through redis-py's `register_script`), atomic in
Redis whatever the number of API replicas: it refills, then takes a request, the request's
tokens and its batch lines together, or, if any of them is short, takes nothing and says
which one and for how long. Time is Redis's own (`TIME`), so replicas' clocks do not
matter. The keys of one API key share a hash tag (`{<key id>}`), so they live on one
Redis Cluster slot.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis

_PREFIX = "ferry:ratelimit:"
_WINDOW_MS = 60_000
_DAY_KEY_TTL = 2 * 86_400

# KEYS: bucket hash, day counter. ARGV: requests/min, tokens/min, tokens wanted, lines
# limit, lines wanted, ms until the day ends, now in ms ("" = Redis TIME). A limit of 0
# is no limit. The hash keeps each bucket's level (r, k), the limits they were filled
# for (rc, kc: give_back reads them) and when they were last brought up to date (t).
# Returns: taken (1/0), the first dimension short ("requests", "tokens", "lines" or ""),
# requests left, tokens left, ms until each bucket is full again, ms until the request
# would pass (-1: never, it is larger than the limit), lines used today.
_TAKE = """
local rpm, tpm, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local line_limit, lines, day_left = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now = tonumber(ARGV[7])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local s = redis.call('HMGET', KEYS[1], 'r', 'k', 't')
local elapsed = math.max(0, now - (tonumber(s[3]) or now))
local function level(stored, limit)
  if limit <= 0 then return 0 end
  local v = tonumber(stored)
  if v == nil then return limit end
  return math.min(limit, v + elapsed * limit / 60000)
end
local r, k = level(s[1], rpm), level(s[2], tpm)
local used = 0
if line_limit > 0 then used = tonumber(redis.call('GET', KEYS[2]) or '0') end
local short, wait = '', 0
if rpm > 0 and r < 1 then
  short, wait = 'requests', math.ceil((1 - r) * 60000 / rpm)
end
if tpm > 0 and k < want then
  local w = -1
  if want <= tpm then w = math.ceil((want - k) * 60000 / tpm) end
  if short == '' then short = 'tokens' end
  if w < 0 or wait < 0 then wait = -1 else wait = math.max(wait, w) end
end
if line_limit > 0 and used + lines > line_limit then
  if short == '' then short = 'lines' end
  if lines > line_limit or wait < 0 then wait = -1 else wait = math.max(wait, day_left) end
end
local taken = 0
if short == '' then
  taken = 1
  if rpm > 0 then r = r - 1 end
  if tpm > 0 then k = k - want end
  if rpm > 0 or tpm > 0 then
    redis.call('HSET', KEYS[1], 'r', tostring(r), 'k', tostring(k), 'rc', rpm, 'kc', tpm,
      't', now)
    redis.call('PEXPIRE', KEYS[1], 60000)
  end
  if line_limit > 0 and lines > 0 then
    used = redis.call('INCRBY', KEYS[2], lines)
    if used == lines then redis.call('EXPIRE', KEYS[2], tonumber(ARGV[8])) end
  end
end
local function full_in(v, limit)
  if limit <= 0 then return 0 end
  return math.ceil((limit - v) * 60000 / limit)
end
return {taken, short, math.floor(math.max(r, 0)), math.floor(math.max(k, 0)),
  full_in(r, rpm), full_in(k, tpm), wait, used}
"""

# KEYS: bucket hash, day counter. ARGV: requests, tokens, lines to give back, now in ms
# ("" = Redis TIME). Refills to now with the limits the buckets were last filled for, then
# adds, capped at those limits. A hash that has expired is full: nothing to give back.
_GIVE_BACK = """
local now = tonumber(ARGV[4])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local s = redis.call('HMGET', KEYS[1], 'r', 'k', 'rc', 'kc', 't')
if s[5] then
  local elapsed = math.max(0, now - tonumber(s[5]))
  local rc, kc = tonumber(s[3]) or 0, tonumber(s[4]) or 0
  local function back(stored, limit, more)
    if limit <= 0 then return 0 end
    return math.min(limit, (tonumber(stored) or limit) + elapsed * limit / 60000 + more)
  end
  redis.call('HSET', KEYS[1], 'r', tostring(back(s[1], rc, tonumber(ARGV[1]))),
    'k', tostring(back(s[2], kc, tonumber(ARGV[2]))), 't', now)
end
local lines = tonumber(ARGV[3])
if lines > 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('DECRBY', KEYS[2], lines)
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits one check applies (None: that one is not limited)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    batch_lines_per_day: int | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """A check's result: whether it was taken, what is left, and when it fills again."""

    taken: bool
    # The first limit that was short ("requests", "tokens", "lines"), None when taken.
    short: str | None
    remaining_requests: int
    remaining_tokens: int
    reset_requests_ms: int
    reset_tokens_ms: int
    # Milliseconds until the same request would pass; None when it never can (it asks
    # for more than the limit itself). 0 when taken.
    retry_ms: int | None
    lines_used: int
    # Milliseconds until the day's batch lines start over.
    reset_lines_ms: int


def _bucket_key(owner: str) -> str:
    return f"{_PREFIX}{{{owner}}}"


def _day_key(owner: str, day: datetime) -> str:
    return f"{_PREFIX}{{{owner}}}:lines:{day:%Y%m%d}"


class RateLimiter:
    """The checks and give-backs of every key, on one Redis client (API and worker)."""

    def __init__(self, redis: Redis, clock: Callable[[], float] | None = None) -> None:
        self._take = redis.register_script(_TAKE)
        self._give_back = redis.register_script(_GIVE_BACK)
        # Seconds since the epoch; None: Redis's own clock (the default). Tests freeze it.
        self.clock = clock

    def _now(self) -> tuple[str, datetime]:
        if self.clock is None:
            return "", datetime.now(UTC)
        now = self.clock()
        return str(int(now * 1000)), datetime.fromtimestamp(now, UTC)

    async def take(self, owner: str, limits: Limits, *, tokens: int = 0, lines: int = 0) -> Verdict:
        """Take one request, `tokens` and `lines` from the key's budgets, all or none."""
        now_ms, now = self._now()
        midnight = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
        day_left_ms = max(1, math.ceil((midnight - now).total_seconds() * 1000))
        raw = await self._take(
            keys=[_bucket_key(owner), _day_key(owner, now)],
            args=[
                limits.requests_per_minute or 0,
                limits.tokens_per_minute or 0,
                max(0, tokens),
                limits.batch_lines_per_day or 0,
                max(0, lines),
                day_left_ms,
                now_ms,
                _DAY_KEY_TTL,
            ],
        )
        taken, short, left_r, left_k, reset_r, reset_k, wait, used = raw
        short_name = short.decode() if isinstance(short, bytes) else str(short)
        return Verdict(
            taken=bool(taken),
            short=short_name or None,
            remaining_requests=int(left_r),
            remaining_tokens=int(left_k),
            reset_requests_ms=int(reset_r),
            reset_tokens_ms=int(reset_k),
            retry_ms=None if int(wait) < 0 else int(wait),
            lines_used=int(used),
            reset_lines_ms=day_left_ms,
        )

    async def give_back(
        self, owner: str, tokens: int = 0, *, requests: int = 0, lines: int = 0
    ) -> None:
        """Return what a key was charged and did not use: tokens a finished job did not
        spend (settlement), or a whole charge whose request then created nothing."""
        if tokens <= 0 and requests <= 0 and lines <= 0:
            return
        now_ms, now = self._now()
        await self._give_back(
            keys=[_bucket_key(owner), _day_key(owner, now)],
            args=[max(0, requests), max(0, tokens), max(0, lines), now_ms],
        )


def unused_tokens(reserved: int | None, prompt: int | None, completion: int | None) -> int:
    """What a finished job gives back: its reservation less what it used (never negative:
    a job that used more than it reserved owes nothing after the fact)."""
    if not reserved:
        return 0
    return max(0, reserved - (prompt or 0) - (completion or 0))
