"""The Lua scripts of the Redis job store (``webapp.queue.streams``, docs/architecture.md §18): each change of
a job is one script, which Redis runs atomically, guarded by the status it leaves and the lease it holds.
Every script is the shared preamble (the names below as Lua constants, the key helpers, ``announce``,
``finish``, ``death``) and its own body; ``SCRIPTS`` is what the store registers.
"""

from __future__ import annotations

from webapp import errors

GROUP = "workers"  # the consumer group of every model's stream
GIVEN_BACK = "given-back"  # the consumer that holds entries given back, idle for ever: the next XAUTOCLAIM takes them
GIVEN_BACK_IDLE_MS = 10**9  # about 11 days: past any lease (JOB_LEASE_SECONDS is at most an hour)

# Shared by every script. ARGV: 1 prefix, 2 a random nonce (delivery ids), 3 now, 4 JOB_TTL, then its own.
PREAMBLE = f"""
local GROUP, GIVEN_BACK, GIVEN_BACK_IDLE_MS = '{GROUP}', '{GIVEN_BACK}', {GIVEN_BACK_IDLE_MS}
local CANCELED, WORKER_LOST = '{errors.CANCELED}', '{errors.WORKER_LOST}'
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
    local fields = {{}}
    for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
    if fields['name'] == GROUP then
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
    redis.call('XACK', stream, GROUP, entry)
    if read_past(stream, entry) then redis.call('XDEL', stream, entry) end
  end
end
local function given_back(id)
  local queue, entry = unpack(redis.call('HMGET', jobkey(id), 'queue', 'entry'))
  redis.call('XCLAIM', P .. 'queue:' .. queue, GROUP, GIVEN_BACK, 0, entry, 'IDLE', GIVEN_BACK_IDLE_MS, 'JUSTID')
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
    finish(id, 'canceled', CANCELED, 'canceled while running; its worker died')
  elseif tonumber(attempt) >= max_attempts then
    finish(id, 'failed', WORKER_LOST,
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
"""

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
  local still = redis.call('XPENDING', stream, GROUP, 'IDLE', tonumber(ARGV[6]), entry, entry, 1)
  if #still == 1 and still[1][2] ~= GIVEN_BACK then
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
    redis.call('XACK', P .. 'queue:' .. queue, GROUP, entry)
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
    redis.call('XCLAIM', P .. 'queue:' .. queue, GROUP, owner, 0, entry, 'JUSTID')
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
  finish(ARGV[5], 'canceled', CANCELED, 'canceled while queued')
elseif status == 'running' and cancel == '0' then
  redis.call('HSET', key, 'cancel_requested', 1)
  redis.call('HINCRBY', key, 'version', 1)
end
return 1
"""

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
  local pending = redis.call('XPENDING', stream, GROUP, '-', '+', 1, owner)
  if #pending == 0 then redis.call('XGROUP', 'DELCONSUMER', stream, GROUP, owner) end
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

SCRIPTS = {
    "submit": PREAMBLE + SUBMIT,
    "lapse": PREAMBLE + LAPSE,
    "take": PREAMBLE + TAKE,
    "renew": PREAMBLE + RENEW,
    "progress": PREAMBLE + PROGRESS,
    "end": PREAMBLE + END,
    "record": PREAMBLE + RECORD,
    "cancel": PREAMBLE + CANCEL,
    "give_back": PREAMBLE + GIVE_BACK,
    "sweep": PREAMBLE + SWEEP,
    "delivery_claim": PREAMBLE + DELIVERY_CLAIM,
    "delivery_end": PREAMBLE + DELIVERY_END,
}
