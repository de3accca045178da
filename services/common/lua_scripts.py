"""Lua scripts for the job record's state changes, so each transition is atomic in Redis.

Register them on a sync or asyncio client with `client.register_script(SOURCE)`; no logic here
beyond the transitions themselves.
"""

from __future__ import annotations

from services.common import keys
from services.common.jobs import IDEMPOTENCY_FIELD

_FINAL = "st == 'succeeded' or st == 'failed' or st == 'cancelled'"


def _announce_left_queue(stream_key: str, job_id: str) -> str:
    """Lua appending the job's id to keys.LEFT_QUEUE as the job leaves `queued` (the API's event
    hub starts reading the job's own stream then)."""
    return (f"redis.call('XADD', {stream_key}, 'MAXLEN', '~', '{keys.LEFT_QUEUE_MAXLEN}', '*', "
            f"'job', {job_id})")


def _extend_idempotency(ttl: str) -> str:
    """Lua giving the Idempotency-Key binding named in the record (KEYS[1]) the record's new TTL,
    while the binding still names this job: it must not die before the job it answers for (a
    retry with the same key would make a second job). It reads a key it is not handed, like
    FRESH_WORKERS: fine on one Redis, not on a cluster."""
    return f"""
local idem = redis.call('HGET', KEYS[1], '{IDEMPOTENCY_FIELD}')
if idem then
  local bound = redis.call('GET', idem)
  if bound then
    local ok, binding = pcall(cjson.decode, bound)
    if ok and type(binding) == 'table' and binding['job_id'] == redis.call('HGET', KEYS[1], 'id')
    then redis.call('EXPIRE', idem, {ttl}) end
  end
end"""


# KEYS: job, queue, queued set, then the Idempotency-Key binding if any. ARGV: ttl_s, Celery
# message, then the record's fields and values (id and created_at among them). Writes the record,
# pushes its message and adds the job to the queued set, all or nothing, and
# gives the binding the record's TTL and its name to the record (CLAIM, FINISH and CANCEL,
# which restart the record's TTL, restart the binding's too). A record that exists already
# means an earlier call did it (its reply was lost and redis-py sent the call again): then
# nothing changes -> 0, else 1. A retried MULTI used to write `queued` over a job a worker had
# claimed meanwhile and push a second message, so the job ran twice and streamed its text twice.
CREATE = f"""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'created_at'),
           redis.call('HGET', KEYS[1], 'id'))
if KEYS[4] then
  redis.call('HSET', KEYS[1], '{IDEMPOTENCY_FIELD}', KEYS[4])
  redis.call('EXPIRE', KEYS[4], ARGV[1])
end
return 1
"""

# KEYS: the Idempotency-Key binding, the job it was claimed for. ARGV: that job's id.
# Deletes the binding only while it names that job and the job has no record (-> 1, else 0):
# after an error that leaves it unknown whether CREATE ran (a lost reply), a job that does exist
# keeps its key, so the client's retry with it gets that job rather than a second one.
RELEASE_IDEMPOTENCY = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local bound = redis.call('GET', KEYS[1])
if not bound then return 0 end
local ok, binding = pcall(cjson.decode, bound)
if not ok or type(binding) ~= 'table' or binding['job_id'] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


# KEYS: job, lease, left-queue stream, queued set. ARGV: owner, now, lease_ttl_ms, job id,
# job ttl_s.
# -> {'missing'} | {final status} | {'leased', holder} | {'claimed', attempts, cancel_requested}
# The record's TTL restarts at the claim: a job that waited in the queue for most of it must
# not expire while it runs (its result would have nowhere to go). Its Idempotency-Key binding's
# restarts with it. Whatever the record says, a worker took the job's message: it waits no more.
CLAIM = f"""
redis.call('ZREM', KEYS[4], ARGV[4])
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {{'missing'}} end
if {_FINAL} then return {{st}} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {{'leased', holder}} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1])
if st == 'queued' then {_announce_left_queue("KEYS[3]", "ARGV[4]")} end
if not redis.call('HGET', KEYS[1], 'started_at') then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[2])
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('EXPIRE', KEYS[1], ARGV[5])
{_extend_idempotency("ARGV[5]")}
return {{'claimed', tostring(attempts), redis.call('HGET', KEYS[1], 'cancel_requested') or ''}}
"""

# A worker's writes to a job it runs: only while the job is `running` and the lease is its own
# or nobody's (it expired while Redis was away). Otherwise another worker took the job over, or
# finished it, and this one must write nothing more.
_OURS = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[1] then return 0 end
"""

# KEYS: job, events, lease. ARGV: owner, lease_ttl_ms. -> 1 while we still own the job, else 0.
# A lease that expired with no new holder (Redis away longer than its TTL, nobody claimed the
# job) is taken back: giving the job up then would leave it `running` with no worker at all,
# since this worker's task is acked when it returns. (events is unused: the keys match STREAM's.)
RENEW = f"""{_OURS}
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: job, events, lease. ARGV: owner, ttl_s, first_token_at ('' if not yet or already
# recorded), the index of the first chunk (counted per owner from 0), then type, text, tokens of
# each chunk. Appends the chunks (and records the first token's time) while the job is ours -> 1;
# else writes nothing -> 0. A chunk whose index this owner already wrote is skipped: a call
# whose reply was lost is sent again (by redis-py's retry, or the next flush), and clients must
# not get its text twice.
STREAM = f"""{_OURS}
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'first_token_at', ARGV[3]) end
local written = 0
if redis.call('HGET', KEYS[1], 'stream_owner') == ARGV[1] then
  written = tonumber(redis.call('HGET', KEYS[1], 'stream_chunks'))
end
local index = tonumber(ARGV[4])
for i = 5, #ARGV, 3 do
  if index >= written then
    redis.call('XADD', KEYS[2], '*', 'type', ARGV[i], 'text', ARGV[i + 1], 'tokens', ARGV[i + 2])
  end
  index = index + 1
end
if index > written then
  redis.call('HSET', KEYS[1], 'stream_owner', ARGV[1], 'stream_chunks', index)
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return 1
"""

# KEYS: job, events, lease, stats.
# ARGV: owner, status, ttl_s, n, field1, value1, ..., m, counter1, incr1, ..., k, fcounter1, fincr1
# Sets the final fields and appends the `done` event once: a second finish (a redelivered task,
# a lost lease) changes nothing and returns 0, but the same owner's retry (its reply was lost)
# learns with 1 that its result is the one recorded. The record's TTL restarts, and its
# Idempotency-Key binding's with it.
FINISH = f"""
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 0 end
if {_FINAL} then
  if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'finished_by') == ARGV[1] then return 1 end
  return 0
end
local holder = redis.call('GET', KEYS[3])
if ARGV[1] ~= '' and holder and holder ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_by', ARGV[1])
local i = 4
local n = tonumber(ARGV[i])
for j = 1, n do redis.call('HSET', KEYS[1], ARGV[i + 2 * j - 1], ARGV[i + 2 * j]) end
i = i + 2 * n + 1
n = tonumber(ARGV[i])
for j = 1, n do redis.call('HINCRBY', KEYS[4], ARGV[i + 2 * j - 1], ARGV[i + 2 * j]) end
i = i + 2 * n + 1
n = tonumber(ARGV[i])
for j = 1, n do redis.call('HINCRBYFLOAT', KEYS[4], ARGV[i + 2 * j - 1], ARGV[i + 2 * j]) end
redis.call('XADD', KEYS[2], '*', 'type', 'done', 'status', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
{_extend_idempotency("ARGV[3]")}
if holder == ARGV[1] then redis.call('DEL', KEYS[3]) end
return 1
"""

# KEYS: job, events, stats, left-queue stream, queued set. ARGV: now, ttl_s, job id.
# queued -> cancelled now (the worker will find it final and skip it); running -> flag for the
# worker to stop between decode steps. -> the status after the call, or 'missing'.
# A cancelled queued job is final, like a finished one: its record's TTL restarts with its
# stream's, and its binding's with them (a job that waited most of its TTL would otherwise
# vanish moments after the cancel, leaving its stream and freeing its Idempotency-Key).
CANCEL = f"""
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1],
             'finish_reason', 'cancelled', 'text', '', 'completion_tokens', '0')
  redis.call('XADD', KEYS[2], '*', 'type', 'done', 'status', 'cancelled')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  {_extend_idempotency("ARGV[2]")}
  redis.call('HINCRBY', KEYS[3], 'jobs:cancelled', 1)
  {_announce_left_queue("KEYS[4]", "ARGV[3]")}
  redis.call('ZREM', KEYS[5], ARGV[3])
  return 'cancelled'
end
if st == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'running'
end
return st
"""


# KEYS: keys.WORKERS. ARGV: the heartbeat key of a worker without its name (keys.worker("")).
# -> the heartbeats of the workers whose key has not expired; the names of the others leave
# the set. (It reads keys it is not handed: fine on one Redis, not on a cluster.)
FRESH_WORKERS = """
local beats = {}
for _, name in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local beat = redis.call('GET', ARGV[1] .. name)
  if beat then beats[#beats + 1] = beat else redis.call('ZREM', KEYS[1], name) end
end
return beats
"""

# KEYS: keys.QUEUED. ARGV: a job record's key without its id (keys.job("")), how many ids to
# check. Drops the oldest ids (up to that many) whose record is missing or not `queued` -> the
# set's size after. The create, claim and cancel keep the set, but not in a pod older than it
# (a rolling upgrade: an old worker's claim, an old API's cancel), nor when a record expires
# unclaimed; those are mostly the oldest ids (popped first, expired first).
QUEUE_DEPTH = """
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)) do
  if redis.call('HGET', ARGV[1] .. id, 'status') ~= 'queued' then
    redis.call('ZREM', KEYS[1], id)
  end
end
return redis.call('ZCARD', KEYS[1])
"""

# KEYS: keys.QUEUED. ARGV: a job record's key without its id (keys.job("")), then job ids.
# Adds each job whose record is `queued` and which the set lacks (an API older than the set
# created it), scored by its created_at -> how many were added. Like QUEUE_DEPTH and
# FRESH_WORKERS it reads keys it is not handed: fine on one Redis, not on a cluster.
ADD_QUEUED = """
local added = 0
for i = 2, #ARGV do
  local record = redis.call('HMGET', ARGV[1] .. ARGV[i], 'status', 'created_at')
  if record[1] == 'queued' and record[2] then
    added = added + redis.call('ZADD', KEYS[1], 'NX', record[2], ARGV[i])
  end
end
return added
"""

# KEYS: job records. -> the 1-based indexes of the jobs not `queued` any more (missing included):
# the API's event hub checks the jobs of its parked streams with one call per batch.
NOT_QUEUED = """
local left = {}
for i, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'status') ~= 'queued' then left[#left + 1] = i end
end
return left
"""


def claim_call(
    job_id: str, owner: str, *, now: float, lease_ttl_s: float, ttl_s: int
) -> dict[str, list]:
    """CLAIM's keys and args for a worker taking job_id: `claim(**claim_call(...))`."""
    return {
        "keys": [keys.job(job_id), keys.lease(job_id), keys.LEFT_QUEUE, keys.QUEUED],
        "args": [owner, repr(now), int(lease_ttl_s * 1000), job_id, ttl_s],
    }


def job_keys(job_id: str) -> list[str]:
    """KEYS of RENEW and STREAM: the job's record, events stream and lease."""
    return [keys.job(job_id), keys.events(job_id), keys.lease(job_id)]


def stream_args(
    owner: str, ttl_s: int, chunks: list, first_token_at: float | None, first_index: int = 0
) -> list:
    """STREAM's ARGV for chunks (objects with kind, text and tokens), the first of which is
    the owner's chunk number `first_index` (0 for its first)."""
    args: list = [owner, ttl_s, "" if first_token_at is None else repr(first_token_at),
                  first_index]
    for chunk in chunks:
        args += [chunk.kind, chunk.text, str(chunk.tokens)]
    return args


def finish_args(
    owner: str,
    status: str,
    ttl_s: int,
    fields: dict[str, str],
    counters: dict[str, int],
    float_counters: dict[str, float],
) -> list[str]:
    """Flatten FINISH's arguments."""
    args = [owner, status, str(ttl_s), str(len(fields))]
    for key, value in fields.items():
        args += [key, value]
    args.append(str(len(counters)))
    for key, incr in counters.items():
        args += [key, str(incr)]
    args.append(str(len(float_counters)))
    for key, fincr in float_counters.items():
        args += [key, repr(float(fincr))]
    return args
