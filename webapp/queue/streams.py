"""The job store for a fleet: Redis, with the queue a Redis Stream per model and a consumer group its workers
read (docs/architecture.md §18). Same contract as the SQLite store (``webapp.queue.store``), so routes,
claimers, deliverers and hooks do not know which they ask.

Every change of a job is one Lua script, run atomically by Redis, guarded by the status it leaves and the
lease it holds, exactly as the SQLite store's guarded UPDATEs:

    submit            one script: the job's hash, SET NX of its Idempotency-Key (with the job's TTL), and
                      XADD of its id to ``queue:<model>``; committed before the 202 is sent
    claim             XAUTOCLAIM first (an entry idle past the lease: its holder died, or it was given back),
                      then XREADGROUP ``>``; then the take script: queued -> running, attempt + 1
    lapse             at each renew, entries idle past the lease (XPENDING IDLE) are given back as deaths
    renew             the take's lease is the entry's idle time in the group: XCLAIM (JUSTID, min-idle 0) by
                      its holder resets it every third of JOB_LEASE_SECONDS
    succeed / fail    by the lease's holder only; XACK and XDEL of the entry, the images beside the job
    release / requeue the entry goes to the ``given-back`` consumer, idle for ever, so the next XAUTOCLAIM of
                      any replica takes it first

Keys (``honest-diffusion:`` and then): ``job:<id>`` (a hash; it expires JOB_TTL after the job's own expiry:
the 410 tombstone), ``img:<id>:<n>`` (expires with the job), ``idem:<owner>:<key>``, ``jobs`` and
``owner:<owner>`` (listings, by submit order), ``s:<model>:<status>`` (the jobs of each status: for counts,
queue positions and the sweep), ``held:<lease owner>`` (what a worker runs), ``queue:<model>`` (the stream),
``delivery:<id>`` and ``deliveries`` (the webhook outbox, by due time), ``job:<id>:deliveries``. Keys are
built inside the scripts: one Redis (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import redis

from webapp import errors
from webapp.queue.store import FINISHED, STATUSES, IdempotencyConflict, StoredJob, StoreUnavailable, new_id
from webapp.settings import Settings

PREFIX = "honest-diffusion:"
GROUP = "workers"
GIVEN_BACK = "given-back"  # the consumer that holds entries given back, idle for ever: the next XAUTOCLAIM takes them
GIVEN_BACK_IDLE_MS = 10**9  # about 11 days: past any lease (JOB_LEASE_SECONDS is at most an hour)
# Redis's answers that mean "not now" (a restart loading its data, a full memory, a failed disk), not a bug here.
UNAVAILABLE_REPLIES = ("LOADING ", "OOM ", "MISCONF ", "READONLY ", "MASTERDOWN ", "BUSY ", "NOREPLICAS ")

# Shared by every script. ARGV: 1 prefix, 2 a random nonce (delivery ids), 3 now, 4 JOB_TTL, then its own.
PREAMBLE = """
local P, NONCE, NOW, TTL = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local made = 0
local function jobkey(id) return P .. 'job:' .. id end
local function announce(id, event)
  local hook, events = unpack(redis.call('HMGET', jobkey(id), 'webhook', 'webhook_events'))
  if not hook or not string.find(events or '', ',' .. event .. ',', 1, true) then return end
  made = made + 1
  local mid = 'msg_' .. NONCE .. made
  redis.call('HSET', P .. 'delivery:' .. mid, 'id', mid, 'job_id', id, 'event', event, 'url', hook,
             'status', 'pending', 'attempt', 0, 'next_at', NOW, 'created_at', NOW)
  redis.call('ZADD', P .. 'deliveries', NOW, mid)
  redis.call('RPUSH', jobkey(id) .. ':deliveries', mid)
end
-- Whether the group has read past ``entry``: an entry it has not read yet stays in the stream until a claim
-- meets it and drops it, since deleting it would leave the group's lag unknown (KEDA scales on that lag).
local function read_past(stream, entry)
  local function parts(id)
    local ms, seq = string.match(id, '(%d+)-(%d+)')
    return tonumber(ms), tonumber(seq)
  end
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local fields = {}
    for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
    if fields['name'] == 'workers' then
      local ms, seq = parts(entry)
      local last_ms, last_seq = parts(fields['last-delivered-id'])
      return ms < last_ms or (ms == last_ms and seq <= last_seq)
    end
  end
  return false
end
local function entry_done(id)
  local queue, entry = unpack(redis.call('HMGET', jobkey(id), 'queue', 'entry'))
  if entry then
    local stream = P .. 'queue:' .. queue
    redis.call('XACK', stream, 'workers', entry)
    if read_past(stream, entry) then redis.call('XDEL', stream, entry) end
  end
end
local function given_back(id)
  local queue, entry = unpack(redis.call('HMGET', jobkey(id), 'queue', 'entry'))
  redis.call('XCLAIM', P .. 'queue:' .. queue, 'workers', 'given-back', 0, entry, 'IDLE', 1000000000, 'JUSTID')
end
local function move(id, from, to, score)
  local queue = redis.call('HGET', jobkey(id), 'queue')
  redis.call('ZREM', P .. 's:' .. queue .. ':' .. from, id)
  redis.call('ZADD', P .. 's:' .. queue .. ':' .. to, score, id)
end
-- A job ends (succeeded, failed, canceled): its status set keeps it until its expiry (for the sweep), and
-- the hash and its deliveries' list outlive that by JOB_TTL (the 410 tombstone).
local function finish(id, status, code, message)
  local key = jobkey(id)
  local from, expires, holder = unpack(redis.call('HMGET', key, 'status', 'expires_at', 'lease_owner'))
  redis.call('HSET', key, 'status', status, 'completed_at', NOW)
  if code then redis.call('HSET', key, 'error_code', code, 'error_message', message) end
  redis.call('HDEL', key, 'lease_owner', 'lease_until')
  redis.call('HINCRBY', key, 'version', 1)
  if holder then redis.call('SREM', P .. 'held:' .. holder, id) end
  move(id, from, status, tonumber(expires))
  entry_done(id)
  local gone = math.ceil(tonumber(expires) + TTL)
  redis.call('EXPIREAT', key, gone)
  redis.call('EXPIREAT', key .. ':deliveries', gone)
  announce(id, 'completed')
end
-- A dead holder's job: queued again as its next attempt, or ended (canceled, or out of attempts).
local function death(id, reason, max_attempts)
  local key = jobkey(id)
  local attempt, cancel, deaths, holder =
    unpack(redis.call('HMGET', key, 'attempt', 'cancel_requested', 'deaths', 'lease_owner'))
  local all = cjson.decode(deaths)
  table.insert(all, 'attempt ' .. attempt .. ': ' .. reason)
  redis.call('HSET', key, 'deaths', cjson.encode(all))
  if cancel == '1' then
    finish(id, 'canceled', ARGV_CANCELED, 'canceled while running; its worker died')
  elseif tonumber(attempt) >= max_attempts then
    finish(id, 'failed', ARGV_WORKER_LOST,
           'the worker died on each of ' .. attempt .. ' attempts: ' .. table.concat(all, '; '))
  else
    if holder then redis.call('SREM', P .. 'held:' .. holder, id) end
    redis.call('HSET', key, 'status', 'queued')
    redis.call('HDEL', key, 'lease_owner', 'lease_until', 'step', 'total_steps')
    redis.call('HINCRBY', key, 'version', 1)
    move(id, 'running', 'queued', tonumber(redis.call('HGET', key, 'seq')))
    return true
  end
  return false
end
""".replace("ARGV_CANCELED", repr(str(errors.CANCELED))).replace("ARGV_WORKER_LOST", repr(str(errors.WORKER_LOST)))

# ARGV 5 id, 6 owner, 7 route, 8 request, 9 digest, 10 idempotency key or '', 11 expires_at, 12 webhook or '',
# 13 its events, 14 the model's queue.
SUBMIT = """
local id, owner, idem, queue = ARGV[5], ARGV[6], ARGV[10], ARGV[14]
local ikey = P .. 'idem:' .. owner .. ':' .. idem
if idem ~= '' then
  local existing = redis.call('GET', ikey)
  if existing then
    if redis.call('HGET', jobkey(existing), 'request_hash') ~= ARGV[9] then return {'conflict', existing} end
    return {'existing', existing}
  end
end
local seq = redis.call('INCR', P .. 'seq')
local key = jobkey(id)
redis.call('HSET', key, 'id', id, 'owner', owner, 'status', 'queued', 'route', ARGV[7], 'request', ARGV[8],
           'request_hash', ARGV[9], 'created_at', NOW, 'expires_at', ARGV[11], 'attempt', 0, 'cancel_requested', 0,
           'deaths', '[]', 'version', 1, 'swept', 0, 'seq', seq, 'queue', queue, 'webhook_events', ARGV[13])
if idem ~= '' then
  redis.call('HSET', key, 'idempotency_key', idem)
  redis.call('SET', ikey, id, 'NX', 'EX', TTL)
end
if ARGV[12] ~= '' then redis.call('HSET', key, 'webhook', ARGV[12]) end
redis.call('ZADD', P .. 'jobs', seq, id)
redis.call('ZADD', P .. 'owner:' .. owner, seq, id)
redis.call('ZADD', P .. 's:' .. queue .. ':queued', seq, id)
redis.call('HSET', key, 'entry', redis.call('XADD', P .. 'queue:' .. queue, '*', 'job', id))
return {'new', id}
"""

# ARGV 5 the model's queue, 6 the lease in ms, 7 JOB_MAX_ATTEMPTS, 8 the reason, then entries found idle past
# the lease. Each, still idle past it now (its holder may have renewed since it was listed), is given back: a
# running job as a death, a job never taken (a claim whose answer was lost) as it is.
LAPSE = """
local stream = P .. 'queue:' .. ARGV[5]
local n = 0
for i = 9, #ARGV do
  local entry = ARGV[i]
  local still = redis.call('XPENDING', stream, 'workers', 'IDLE', tonumber(ARGV[6]), entry, entry, 1)
  if #still == 1 and still[1][2] ~= 'given-back' then
    local found = redis.call('XRANGE', stream, entry, entry)
    local id = #found == 1 and found[1][2][2] or nil
    local status, mine = nil, nil
    if id then status, mine = unpack(redis.call('HMGET', jobkey(id), 'status', 'entry')) end
    if mine == entry and status == 'running' then
      local holder = redis.call('HGET', jobkey(id), 'lease_owner') or '?'
      if death(id, ARGV[8] .. ' (' .. holder .. ')', tonumber(ARGV[7])) then given_back(id) end
      n = n + 1
    elseif mine == entry and status == 'queued' then
      given_back(id)
    end
  end
end
return n
"""

# ARGV 5 id, 6 entry, 7 lease owner, 8 lease until, 9 JOB_MAX_ATTEMPTS, 10 the lapsed lease's reason.
TAKE = """
local id, entry, owner = ARGV[5], ARGV[6], ARGV[7]
local key = jobkey(id)
local status, queue, mine = unpack(redis.call('HMGET', key, 'status', 'queue', 'entry'))
if mine ~= entry or (status ~= 'queued' and status ~= 'running') then
  -- gone (expired), ended (canceled while queued), or an entry left behind: nothing to run
  if queue then
    redis.call('XACK', P .. 'queue:' .. queue, 'workers', entry)
    redis.call('XDEL', P .. 'queue:' .. queue, entry)
  end
  return false
end
if status == 'running' and not death(id, ARGV[10] .. ' (' .. (redis.call('HGET', key, 'lease_owner') or '?') .. ')',
                                     tonumber(ARGV[9])) then
  return false
end
redis.call('HINCRBY', key, 'attempt', 1)
redis.call('HINCRBY', key, 'version', 1)
redis.call('HSET', key, 'status', 'running', 'lease_owner', owner, 'lease_until', ARGV[8], 'started_at', NOW, 'step', 0)
redis.call('HDEL', key, 'total_steps')
redis.call('SADD', P .. 'held:' .. owner, id)
move(id, 'queued', 'running', tonumber(redis.call('HGET', key, 'seq')))
announce(id, 'start')
return redis.call('HGETALL', key)
"""

# ARGV 5 lease owner, 6 lease until, then the ids of the jobs it runs. Returns those a client asked to cancel.
RENEW = """
local owner = ARGV[5]
local canceled = {}
for i = 7, #ARGV do
  local id = ARGV[i]
  local key = jobkey(id)
  local status, holder, queue, entry, cancel =
    unpack(redis.call('HMGET', key, 'status', 'lease_owner', 'queue', 'entry', 'cancel_requested'))
  if status == 'running' and holder == owner then
    redis.call('HSET', key, 'lease_until', ARGV[6])
    redis.call('XCLAIM', P .. 'queue:' .. queue, 'workers', owner, 0, entry, 'JUSTID')
    if cancel == '1' then table.insert(canceled, id) end
  else
    redis.call('SREM', P .. 'held:' .. owner, id)
  end
end
return canceled
"""

# ARGV 5 id, 6 lease owner, 7 step, 8 total. Returns -1 (not this holder's), else cancel_requested.
PROGRESS = """
local key = jobkey(ARGV[5])
local status, holder, cancel = unpack(redis.call('HMGET', key, 'status', 'lease_owner', 'cancel_requested'))
if status ~= 'running' or holder ~= ARGV[6] then return -1 end
redis.call('HSET', key, 'step', ARGV[7], 'total_steps', ARGV[8])
redis.call('HINCRBY', key, 'version', 1)
announce(ARGV[5], 'progress')
return tonumber(cancel)
"""

# ARGV 5 id, 6 lease owner, 7 status, 8 code or '', 9 message, 10 output JSON or '', then media type and
# data of each image.
END = """
local id = ARGV[5]
local key = jobkey(id)
local status, holder, expires = unpack(redis.call('HMGET', key, 'status', 'lease_owner', 'expires_at'))
if status ~= 'running' or holder ~= ARGV[6] then return 0 end
if ARGV[10] ~= '' then redis.call('HSET', key, 'output', ARGV[10]) end
local n = 0
for i = 11, #ARGV, 2 do
  local image = P .. 'img:' .. id .. ':' .. n
  redis.call('HSET', image, 'media_type', ARGV[i], 'data', ARGV[i + 1])
  redis.call('EXPIREAT', image, math.ceil(tonumber(expires)))
  n = n + 1
end
redis.call('HSET', key, 'images', n)
if ARGV[8] ~= '' then finish(id, ARGV[7], ARGV[8], ARGV[9]) else finish(id, ARGV[7]) end
return 1
"""

# ARGV 5 id, 6 owner, 7 route, 8 request, 9 output, 10 expires_at, 11 the model's queue, then the images.
RECORD = """
local id, owner, queue = ARGV[5], ARGV[6], ARGV[11]
local seq = redis.call('INCR', P .. 'seq')
local key = jobkey(id)
redis.call('HSET', key, 'id', id, 'owner', owner, 'status', 'running', 'route', ARGV[7], 'request', ARGV[8],
           'request_hash', '', 'created_at', NOW, 'started_at', NOW, 'expires_at', ARGV[10], 'attempt', 1,
           'cancel_requested', 0, 'deaths', '[]', 'version', 1, 'swept', 0, 'seq', seq, 'queue', queue,
           'webhook_events', '', 'output', ARGV[9])
redis.call('ZADD', P .. 'jobs', seq, id)
redis.call('ZADD', P .. 'owner:' .. owner, seq, id)
local n = 0
for i = 12, #ARGV, 2 do
  local image = P .. 'img:' .. id .. ':' .. n
  redis.call('HSET', image, 'media_type', ARGV[i], 'data', ARGV[i + 1])
  redis.call('EXPIREAT', image, math.ceil(tonumber(ARGV[10])))
  n = n + 1
end
redis.call('HSET', key, 'images', n)
finish(id, 'succeeded')
return 1
"""

# ARGV 5 id. A queued job is canceled at once; a running one flagged for its holder.
CANCEL = """
local key = jobkey(ARGV[5])
local status, cancel = unpack(redis.call('HMGET', key, 'status', 'cancel_requested'))
if status == 'queued' then
  finish(ARGV[5], 'canceled', ARGV_CANCELED, 'canceled while queued')
elseif status == 'running' and cancel == '0' then
  redis.call('HSET', key, 'cancel_requested', 1)
  redis.call('HINCRBY', key, 'version', 1)
end
return 1
""".replace("ARGV_CANCELED", repr(str(errors.CANCELED)))

# ARGV 5 lease owner, 6 one job id or '', 7 1 = a death (counted), 0 = given back uncounted, 8 the reason,
# 9 JOB_MAX_ATTEMPTS, 10 the owner's queue (its consumer is dropped once it holds nothing).
GIVE_BACK = """
local owner, only, counted = ARGV[5], ARGV[6], ARGV[7] == '1'
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', P .. 'held:' .. owner)) do
  local key = jobkey(id)
  local status, holder = unpack(redis.call('HMGET', key, 'status', 'lease_owner'))
  if (only == '' or only == id) and status == 'running' and holder == owner then
    n = n + 1
    if counted then
      if death(id, ARGV[8], tonumber(ARGV[9])) then given_back(id) end
    else
      redis.call('HSET', key, 'status', 'queued')
      redis.call('HINCRBY', key, 'attempt', -1)
      redis.call('HINCRBY', key, 'version', 1)
      redis.call('HDEL', key, 'lease_owner', 'lease_until', 'step')
      move(id, 'running', 'queued', tonumber(redis.call('HGET', key, 'seq')))
      given_back(id)
    end
    redis.call('SREM', P .. 'held:' .. owner, id)
  elseif status ~= 'running' or holder ~= owner then
    redis.call('SREM', P .. 'held:' .. owner, id)
  end
end
local stream = P .. 'queue:' .. ARGV[10]
if only == '' and redis.call('EXISTS', stream) == 1 then
  local pending = redis.call('XPENDING', stream, 'workers', '-', '+', 1, owner)
  if #pending == 0 then redis.call('XGROUP', 'DELCONSUMER', stream, 'workers', owner) end
end
return n
"""

# ARGV 5 the model's queue. Finished jobs past their expiry lose their request, output and images.
SWEEP = """
local n = 0
for _, status in ipairs({'succeeded', 'failed', 'canceled'}) do
  local set = P .. 's:' .. ARGV[5] .. ':' .. status
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', set, '-inf', NOW)) do
    local key = jobkey(id)
    local images = tonumber(redis.call('HGET', key, 'images') or '0')
    for i = 0, images - 1 do redis.call('DEL', P .. 'img:' .. id .. ':' .. i) end
    if redis.call('EXISTS', key) == 1 then
      redis.call('HSET', key, 'swept', 1, 'request', '{}')
      redis.call('HDEL', key, 'output')
      redis.call('HINCRBY', key, 'version', 1)
      -- listings leave a swept job out: its ids go from them now, so they hold only what they can show
      redis.call('ZREM', P .. 'jobs', id)
      redis.call('ZREM', P .. 'owner:' .. redis.call('HGET', key, 'owner'), id)
    end
    redis.call('ZREM', set, id)
    n = n + 1
  end
end
return n
"""

# The outbox. ARGV 5 lease seconds: the oldest due delivery (pending, or a lapsed deliverer's), leased.
DELIVERY_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', P .. 'deliveries', '-inf', NOW, 'LIMIT', 0, 1)
if #due == 0 then return false end
local key = P .. 'delivery:' .. due[1]
if redis.call('EXISTS', key) == 0 then
  redis.call('ZREM', P .. 'deliveries', due[1])
  return false
end
local until_ = NOW + tonumber(ARGV[5])
redis.call('ZADD', P .. 'deliveries', until_, due[1])
redis.call('HINCRBY', key, 'attempt', 1)
redis.call('HSET', key, 'status', 'sending', 'lease_until', until_)
return redis.call('HGETALL', key)
"""
# ARGV 5 delivery id, 6 status ('delivered', 'failed' or 'pending'), 7 error or '', 8 next try (pending).
DELIVERY_END = """
local key = P .. 'delivery:' .. ARGV[5]
redis.call('HSET', key, 'status', ARGV[6])
redis.call('HDEL', key, 'lease_until')
if ARGV[7] ~= '' then redis.call('HSET', key, 'last_error', ARGV[7]) end
if ARGV[6] == 'pending' then
  redis.call('HSET', key, 'next_at', ARGV[8])
  redis.call('ZADD', P .. 'deliveries', ARGV[8], ARGV[5])
else
  redis.call('ZREM', P .. 'deliveries', ARGV[5])
  redis.call('EXPIRE', key, TTL)
end
return 1
"""

_INTS = ("attempt", "step", "total_steps", "version", "seq", "images")
_FLOATS = ("created_at", "started_at", "completed_at", "expires_at", "lease_until")


def _decoded(raw: dict[bytes, bytes]) -> dict[str, Any]:
    return {key.decode(): value.decode() for key, value in raw.items()}


def _job(fields: dict[str, str], queue_position: int | None = None) -> StoredJob:
    def number(name: str, kind: type) -> Any:
        value = fields.get(name)
        return kind(value) if value not in (None, "") else None

    return StoredJob(
        id=fields["id"],
        owner=fields["owner"],
        status=fields["status"],
        route=fields["route"],
        request=json.loads(fields.get("request") or "{}"),
        created_at=float(fields["created_at"]),
        started_at=number("started_at", float),
        completed_at=number("completed_at", float),
        expires_at=float(fields["expires_at"]),
        attempt=int(fields.get("attempt", 0)),
        lease_owner=fields.get("lease_owner"),
        lease_until=number("lease_until", float),
        cancel_requested=fields.get("cancel_requested") == "1",
        step=number("step", int),
        total_steps=number("total_steps", int),
        error_code=fields.get("error_code"),
        error_message=fields.get("error_message"),
        output=json.loads(fields["output"]) if fields.get("output") else None,
        deaths=json.loads(fields.get("deaths") or "[]"),
        version=int(fields.get("version", 1)),
        swept=fields.get("swept") == "1",
        webhook=fields.get("webhook"),
        webhook_events=tuple(event for event in fields.get("webhook_events", "").split(",") if event),
        queue_position=queue_position,
    )


class RedisJobStore:
    """The jobs in the Redis at ``settings.job_store`` (redis:// or rediss://), this server's model's queue a
    stream of its own. Cheap to make; a connection is opened on first use, one pool per process."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.job_store
        self.ttl = settings.job_ttl
        self.lease_s = settings.job_lease_seconds
        self.max_attempts = settings.job_max_attempts
        self.queue = settings.model_name
        self.replica = settings.replica_name
        self.stream = f"{PREFIX}queue:{self.queue}"
        self.client = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)
        self.outbox = RedisOutbox(self)
        self._group_made = False
        self._scripts = {
            name: self.client.register_script(PREAMBLE + body)
            for name, body in (("submit", SUBMIT), ("take", TAKE), ("renew", RENEW), ("progress", PROGRESS),
                               ("end", END), ("record", RECORD), ("cancel", CANCEL), ("give_back", GIVE_BACK),
                               ("sweep", SWEEP), ("delivery_claim", DELIVERY_CLAIM), ("delivery_end", DELIVERY_END),
                               ("lapse", LAPSE))
        }  # fmt: skip

    def describe(self) -> str:
        """Where the store is, without the password."""
        parsed = self.client.connection_pool.connection_kwargs
        return f"redis://{parsed.get('host', '?')}:{parsed.get('port', '?')}/{parsed.get('db', 0)}"

    def exists(self) -> bool:
        """Always: a shared store is there whether or not this server took a job."""
        return True

    # -- Redis calls ------------------------------------------------------------------------------------

    def _call(self, what: str, command: Any) -> Any:
        """Run ``command()``; StoreUnavailable when Redis cannot answer now (down, loading, full)."""
        try:
            return command()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"job store {self.describe()} cannot {what}: {exc}") from exc
        except redis.ResponseError as exc:
            if str(exc).startswith(UNAVAILABLE_REPLIES):
                raise StoreUnavailable(f"job store {self.describe()} cannot {what}: {exc}") from exc
            raise

    def _run(self, name: str, *args: Any, what: str = "be written") -> Any:
        argv = [PREFIX, secrets.token_urlsafe(12), repr(time.time()), self.ttl, *args]
        return self._call(what, lambda: self._scripts[name](keys=[], args=argv))

    def _ensure_group(self) -> None:
        """The consumer group of this model's stream, made with the stream if neither is there yet."""
        if self._group_made:
            return
        try:
            self._call("be written", lambda: self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True))
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_made = True

    def _fields(self, job_id: str) -> dict[str, str] | None:
        raw = self._call("be read", lambda: self.client.hgetall(PREFIX + "job:" + job_id))
        return _decoded(raw) if raw else None

    # -- clients' side ----------------------------------------------------------------------------------

    def submit(
        self,
        owner: str,
        route: str,
        request: dict[str, Any],
        idempotency_key: str | None = None,
        webhook: str | None = None,
        webhook_events: tuple[str, ...] = (),
    ) -> tuple[StoredJob, bool]:
        """As the SQLite store's submit: stored and queued before it returns; with an ``idempotency_key``
        the owner's earlier job from the same body instead (the key is SET NX, with the job's TTL)."""
        from webapp.queue.store import request_hash

        self._ensure_group()
        digest = request_hash(route, [request, webhook, sorted(webhook_events)])
        events = "," + ",".join(webhook_events) + "," if webhook else ""
        expires_at = time.time() + self.ttl
        kind, job_id = self._run(
            "submit", new_id(), owner, route, json.dumps(request), digest, idempotency_key or "", repr(expires_at),
            webhook or "", events, self.queue,
        )  # fmt: skip
        job_id = job_id.decode()
        if kind == b"conflict":
            raise IdempotencyConflict(job_id)
        job = self.get(job_id)
        assert job is not None
        return job, kind == b"new"

    def record(
        self,
        job_id: str,
        owner: str,
        route: str,
        request: dict[str, Any],
        output: dict[str, Any],
        images: list[tuple[str, bytes]],
    ) -> None:
        """Keep a request answered at once as a succeeded job with its images (OpenAI's url answers)."""
        flat = [part for media_type, data in images for part in (media_type, data)]
        expires_at = time.time() + self.ttl
        self._run("record", job_id, owner, route, json.dumps(request), json.dumps(output), repr(expires_at),
                  self.queue, *flat)  # fmt: skip

    def get(self, job_id: str) -> StoredJob | None:
        fields = self._fields(job_id)
        if fields is None:
            return None
        position = None
        if fields["status"] == "queued":
            rank = self._call("be read", lambda: self.client.zrank(f"{PREFIX}s:{fields['queue']}:queued", job_id))
            position = rank if rank is not None else 0
        return _job(fields, position)

    def list(self, owner: str | None, limit: int = 20, status: str | None = None) -> list[StoredJob]:
        """The newest jobs first, of ``owner`` (everyone's when None); ids whose job expired are dropped
        from the listing as they are met."""
        index = f"{PREFIX}owner:{owner}" if owner is not None else f"{PREFIX}jobs"
        found: list[StoredJob] = []
        start = 0
        while len(found) < limit:
            ids = self._call("be read", lambda s=start: self.client.zrevrange(index, s, s + 99))
            if not ids:
                break
            start += len(ids)
            pipe = self.client.pipeline(transaction=False)
            for raw_id in ids:
                pipe.hgetall(PREFIX + "job:" + raw_id.decode())
            gone = []
            for raw_id, raw in zip(ids, self._call("be read", pipe.execute), strict=True):
                if not raw:
                    gone.append(raw_id)
                    continue
                job = _job(_decoded(raw))
                if not job.swept and (status is None or job.status == status):
                    found.append(job)
            if gone:
                self._call("be written", lambda g=gone: self.client.zrem(index, *g))
                start -= len(gone)
        return found[:limit]

    def image(self, job_id: str, n: int) -> tuple[str, bytes] | None:
        media_type, data = self._call(
            "be read", lambda: self.client.hmget(f"{PREFIX}img:{job_id}:{n}", "media_type", "data")
        )
        return (media_type.decode(), data) if media_type is not None else None

    def cancel(self, job_id: str) -> StoredJob | None:
        """As the SQLite store's: a queued job canceled at once (its entry removed), a running one flagged."""
        self._run("cancel", job_id)
        return self.get(job_id)

    # -- workers' side ----------------------------------------------------------------------------------

    def claim(self, lease_owner: str) -> StoredJob | None:
        """The oldest entry given back or idle past its lease (XAUTOCLAIM), else the next new one
        (XREADGROUP), taken under ``lease_owner``'s lease; None when there is none."""
        self._ensure_group()
        lease_ms = int(self.lease_s * 1000)
        for _ in range(8):  # entries of jobs canceled or expired meanwhile are dropped as they are met
            try:
                reply = self._call(
                    "be read",
                    lambda: self.client.xautoclaim(self.stream, GROUP, lease_owner, lease_ms, "0-0", count=1),
                )
                entries = reply[1]
                if not entries:
                    read = self._call(
                        "be read",
                        lambda: self.client.xreadgroup(GROUP, lease_owner, {self.stream: ">"}, count=1),
                    )
                    entries = read[0][1] if read else []
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._group_made = False  # Redis lost it (started empty): made again, and looked at next time
                self._ensure_group()
                return None
            if not entries:
                return None
            entry_id, fields = entries[0]
            if not fields:  # the entry was deleted after it was delivered
                continue
            taken = self._run(
                "take", fields[b"job"].decode(), entry_id.decode(), lease_owner, repr(time.time() + self.lease_s),
                self.max_attempts, "its lease ran out (the worker stopped renewing it)",
            )  # fmt: skip
            if taken:
                pairs = iter(taken)
                return _job({key.decode(): value.decode() for key, value in zip(pairs, pairs, strict=True)})
        return None

    def renew(self, lease_owner: str, job_ids: list[str]) -> list[str]:
        """Extend the leases ``lease_owner`` holds on ``job_ids`` (their entries' idle time starts again; any
        other job under its name lapses); the ids of those a client asked to cancel."""
        if not job_ids:
            return []
        until = repr(time.time() + self.lease_s)
        return [raw.decode() for raw in self._run("renew", lease_owner, until, *job_ids)]

    def progress(self, job_id: str, lease_owner: str, step: int, total: int) -> bool:
        return self._run("progress", job_id, lease_owner, step, total) == 0

    def succeed(self, job_id: str, lease_owner: str, output: dict[str, Any], images: list[tuple[str, bytes]]) -> bool:
        flat = [part for media_type, data in images for part in (media_type, data)]
        return self._run("end", job_id, lease_owner, "succeeded", "", "", json.dumps(output), *flat) == 1

    def finish(self, job_id: str, lease_owner: str, status: str, code: str, message: str) -> bool:
        return self._run("end", job_id, lease_owner, status, code, message, "") == 1

    def requeue(self, lease_owner: str | None = None, job_id: str | None = None) -> int:
        """Give back uncounted the running jobs of ``lease_owner`` (None: of every worker of this replica,
        the server stopped), or just ``job_id``: first in line for the next claim of any replica."""
        return sum(
            self._run("give_back", owner, job_id or "", 0, "", self.max_attempts, self.queue)
            for owner in self._owners(lease_owner)
        )

    def release(self, reason: str, lease_owner: str | None = None, expired_before: float | None = None) -> int:
        """A dead holder's jobs, as deaths: those of ``lease_owner``, those whose lease lapsed (``expired_before``:
        their entries idle in the group past JOB_LEASE_SECONDS, found with XPENDING), or (neither given) those of
        every worker of this replica (it restarted). A job given back is claimed first by any replica."""
        if expired_before is not None:
            self._ensure_group()
            lease_ms = int(self.lease_s * 1000)
            lapsed = self._call(
                "be read",
                lambda: self.client.xpending_range(self.stream, GROUP, "-", "+", 100, idle=lease_ms),
            )
            entries = [row["message_id"].decode() for row in lapsed if row["consumer"].decode() != GIVEN_BACK]
            if not entries:
                return 0
            return self._run("lapse", self.queue, lease_ms, self.max_attempts, reason, *entries)
        return sum(
            self._run("give_back", owner, "", 1, reason, self.max_attempts, self.queue)
            for owner in self._owners(lease_owner)
        )

    def _owners(self, lease_owner: str | None) -> list[str]:
        """``lease_owner``, or every lease owner of this replica that holds a job (``<replica>/<pid>``)."""
        if lease_owner is not None:
            return [lease_owner]
        pattern = f"{PREFIX}held:{self.replica}/*"
        keys = self._call("be read", lambda: list(self.client.scan_iter(match=pattern, count=1000)))
        return [key.decode().removeprefix(PREFIX + "held:") for key in keys]

    # -- housekeeping -----------------------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> int:
        if now is None:
            return self._run("sweep", self.queue)
        argv = [PREFIX, secrets.token_urlsafe(12), repr(now), self.ttl, self.queue]
        return self._call("be written", lambda: self._scripts["sweep"](keys=[], args=argv))

    def counts(self) -> tuple[dict[str, int], float]:
        """This model's jobs by status (the swept ones apart), and the age of its oldest queued job."""
        pipe = self.client.pipeline(transaction=False)
        for status in STATUSES:
            pipe.zcard(f"{PREFIX}s:{self.queue}:{status}")
        pipe.zrange(f"{PREFIX}s:{self.queue}:queued", 0, 0)
        *sizes, oldest = self._call("be read", pipe.execute)
        by_status = dict(zip(STATUSES, sizes, strict=True))
        if not oldest:
            return by_status, 0.0
        created = self._call("be read", lambda: self.client.hget(PREFIX + "job:" + oldest[0].decode(), "created_at"))
        return by_status, (max(0.0, time.time() - float(created)) if created else 0.0)


class RedisOutbox:
    """The webhook deliveries in Redis: the oldest due one leased to one deliverer of any replica."""

    def __init__(self, store: RedisJobStore) -> None:
        self.store = store

    def claim(self, lease_s: float) -> dict[str, Any] | None:
        taken = self.store._run("delivery_claim", lease_s)
        if not taken:
            return None
        pairs = iter(taken)
        fields = {key.decode(): value.decode() for key, value in zip(pairs, pairs, strict=True)}
        return {**fields, "attempt": int(fields["attempt"]), "payload": fields.get("payload")}

    def keep_payload(self, delivery_id: str, payload: str) -> None:
        key = f"{PREFIX}delivery:{delivery_id}"
        self.store._call("be written", lambda: self.store.client.hsetnx(key, "payload", payload))

    def ended(self, delivery_id: str, status: str, error: str | None = None) -> None:
        self.store._run("delivery_end", delivery_id, status, error or "", "")

    def later(self, delivery_id: str, delay_s: float, error: str) -> None:
        self.store._run("delivery_end", delivery_id, "pending", error, repr(time.time() + delay_s))

    def of_job(self, job_id: str) -> list[dict[str, Any]]:
        ids = self.store._call("be read", lambda: self.store.client.lrange(f"{PREFIX}job:{job_id}:deliveries", 0, -1))
        pipe = self.store.client.pipeline(transaction=False)
        for raw in ids:
            pipe.hgetall(f"{PREFIX}delivery:{raw.decode()}")
        return [_decoded(raw) for raw in self.store._call("be read", pipe.execute) if raw]


__all__ = ["FINISHED", "RedisJobStore", "RedisOutbox"]
