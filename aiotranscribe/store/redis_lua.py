"""The Lua scripts of the Redis store: each write is one script, atomic on the server.

Every script has the job's record at KEYS[1]; those taking a token have ``ops:{id}`` at
KEYS[3] and the token at ARGV[1] (a resent script returns its first reply). Lua sees record
values as their JSON text.
"""

from __future__ import annotations

import json

from aiotranscribe.jobs import TERMINAL

# How long a write's reply is kept for a resend of it (far longer than the retries take).
OPS_TTL_S = 600

PRELUDE = f"""
local TERMINAL = {{{", ".join(f"['{json.dumps(s)}']=true" for s in sorted(TERMINAL))}}}
local function replayed()
  if ARGV[1] == '' then return false end
  return redis.call('HGET', KEYS[3], ARGV[1])
end
local function remember(reply)
  if ARGV[1] ~= '' then
    redis.call('HSET', KEYS[3], ARGV[1], reply)
    redis.call('EXPIRE', KEYS[3], {OPS_TTL_S})
  end
  return reply
end
local function live()
  local status = redis.call('HGET', KEYS[1], 'status')
  return status and not TERMINAL[status]
end
-- ARGV[i]: a count, then (name, JSON) pairs written to the record. Returns the next index.
local function apply(i)
  local n = tonumber(ARGV[i])
  for k = 0, n - 1 do
    redis.call('HSET', KEYS[1], ARGV[i + 1 + 2 * k], ARGV[i + 2 + 2 * k])
  end
  return i + 1 + 2 * n
end
-- ARGV[i]: a count, then (type, ts, fields) triples appended to KEYS[2] as <seq>-0.
-- Returns the first seq and the next index.
local function append(i)
  local n = tonumber(ARGV[i])
  local seq = tonumber(redis.call('HGET', KEYS[1], 'last_seq') or '0')
  local first = seq + 1
  for k = 0, n - 1 do
    seq = seq + 1
    local j = i + 1 + 3 * k
    redis.call('XADD', KEYS[2], tostring(seq) .. '-0',
      't', ARGV[j], 'ts', ARGV[j + 1], 'f', ARGV[j + 2])
  end
  if n > 0 then redis.call('HSET', KEYS[1], 'last_seq', tostring(seq)) end
  return first, i + 1 + 3 * n
end
"""

# KEYS: job ev ops order tenant live hooks; ARGV: token id member live hook owner changes
# events
CREATE = (
    PRELUDE
    + """
local prev = replayed()
if prev then return prev end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('job ' .. ARGV[2] .. ' exists')
end
local i = apply(7)
redis.call('HSET', KEYS[1], '_order', ARGV[3], '_tenant', KEYS[5], '_owner', ARGV[6])
redis.call('ZADD', KEYS[4], 0, ARGV[3])
redis.call('ZADD', KEYS[5], 0, ARGV[3])
if ARGV[4] == '1' then redis.call('SADD', KEYS[6], ARGV[2]) end
if ARGV[5] == '1' then redis.call('SADD', KEYS[7], ARGV[2]) end
local first = append(i)
return remember(tostring(first))
"""
)

# KEYS: job ev ops live ended sl res; ARGV: token id finished_at changes events slices
# (slices: -1 for none, else a count and (start, frames) pairs replacing the job's slices).
# Returns the first event's seq, or '' when the job has ended or is unknown.
UPDATE = (
    PRELUDE
    + """
local prev = replayed()
if prev then return prev end
if not live() then return '' end
local i = apply(4)
local first
first, i = append(i)
local n = tonumber(ARGV[i])
if n >= 0 then
  redis.call('DEL', KEYS[6], KEYS[7])
  redis.call('HSET', KEYS[6], 'n', n)
  for k = 0, n - 1 do
    local s = tostring(k)
    redis.call('HSET', KEYS[6], 'p' .. s, ARGV[i + 1 + 2 * k] .. ' ' .. ARGV[i + 2 + 2 * k],
      's' .. s, 'queued', 'e' .. s, 0, 'a' .. s, 0)
  end
end
if ARGV[3] ~= '' then
  redis.call('SREM', KEYS[4], ARGV[2])
  redis.call('ZADD', KEYS[5], ARGV[3], ARGV[2])
end
return remember(tostring(first))
"""
)

# KEYS: job hooks; ARGV: mode id [hook] changes. The record afterwards, or nil.
SET_FIELDS = (
    PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[1] == 'status' then
  if not live() then return false end
  apply(3)
elseif ARGV[1] == 'cancel' then
  if live() then apply(3) end
else
  apply(4)
  if ARGV[3] == '1' then redis.call('SADD', KEYS[2], ARGV[2])
  else redis.call('SREM', KEYS[2], ARGV[2]) end
end
return redis.call('HGETALL', KEYS[1])
"""
)

# KEYS: job sl; ARGV: owner until idx... Per slice its epoch, or -1 when not leased.
LEASE = (
    PRELUDE
    + """
local ok = live()
local out = {}
for k = 3, #ARGV do
  local i = ARGV[k]
  local state = redis.call('HGET', KEYS[2], 's' .. i)
  if ok and state and state ~= 'done' then
    redis.call('HSET', KEYS[2], 's' .. i, 'leased', 'o' .. i, ARGV[1], 'u' .. i, ARGV[2])
    redis.call('HINCRBY', KEYS[2], 'a' .. i, 1)
    out[#out + 1] = tonumber(redis.call('HGET', KEYS[2], 'e' .. i))
  else
    out[#out + 1] = -1
  end
end
return out
"""
)

# KEYS: job sl; ARGV: idx... (none: every leased slice). Leased slices go back, epoch + 1.
REQUEUE_BODY = """
local function requeue(i)
  if redis.call('HGET', KEYS[2], 's' .. i) ~= 'leased' then return 0 end
  redis.call('HSET', KEYS[2], 's' .. i, 'queued')
  redis.call('HINCRBY', KEYS[2], 'e' .. i, 1)
  redis.call('HDEL', KEYS[2], 'o' .. i, 'u' .. i)
  return 1
end
"""
REQUEUE = (
    REQUEUE_BODY
    + """
local count = 0
if #ARGV == 0 then
  for k = 0, tonumber(redis.call('HGET', KEYS[2], 'n') or '0') - 1 do
    count = count + requeue(tostring(k))
  end
else
  for k = 1, #ARGV do count = count + requeue(ARGV[k]) end
end
return count
"""
)

# KEYS: job sl; ARGV: the owner seen ('' for none), the new owner (the same at a restart of
# one process: its own jobs). Takes a live job over only if nobody took it since it was
# seen; its leased slices go back to the queue with epoch + 1 (whatever the old owner still
# computes is refused). Returns 1 when taken.
ADOPT = (
    PRELUDE
    + """
if not live() then return 0 end
local owner = redis.call('HGET', KEYS[1], '_owner') or ''
if owner == ARGV[2] and ARGV[1] ~= ARGV[2] then return 1 end  -- a resend of one that ran
if owner ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], '_owner', ARGV[2])
"""
    + REQUEUE_BODY
    + """
for k = 0, tonumber(redis.call('HGET', KEYS[2], 'n') or '0') - 1 do requeue(tostring(k)) end
return 1
"""
)

# KEYS: job ev ops sl res; ARGV: token (idx epoch result)... A '1' or '0' per result:
# accepted only from the current lease of a live job, and only once (HSETNX on the result).
COMMIT = (
    PRELUDE
    + """
local prev = replayed()
if prev then return prev end
local ok = live()
local out = {}
for k = 2, #ARGV, 3 do
  local i = ARGV[k]
  if ok and redis.call('HGET', KEYS[4], 's' .. i) == 'leased'
      and redis.call('HGET', KEYS[4], 'e' .. i) == ARGV[k + 1]
      and redis.call('HSETNX', KEYS[5], i, ARGV[k + 2]) == 1 then
    redis.call('HSET', KEYS[4], 's' .. i, 'done')
    redis.call('HDEL', KEYS[4], 'o' .. i, 'u' .. i)
    out[#out + 1] = '1'
  else
    out[#out + 1] = '0'
  end
end
return remember(table.concat(out))
"""
)

# KEYS: job ev sl res ops order tenant live ended hooks; ARGV: id keep_hooked. 1 if deleted.
DELETE = """
local member = redis.call('HGET', KEYS[1], '_order')
if not member then return 0 end
if ARGV[2] == '1' and redis.call('SISMEMBER', KEYS[10], ARGV[1]) == 1 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('ZREM', KEYS[6], member)
redis.call('ZREM', KEYS[7], member)
redis.call('SREM', KEYS[8], ARGV[1])
redis.call('ZREM', KEYS[9], ARGV[1])
redis.call('SREM', KEYS[10], ARGV[1])
return 1
"""
