"""The cache's Lua scripts: each is one atomic round trip (see ADR 0005)."""

from __future__ import annotations

# One round trip: write the value only if our lease survived (a delete kills the lease, so a
# load that raced an invalidation never writes the old value back — memcache leases).
_SET_IF_LEASE = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""
# A miss asks, atomically: is the value there now? if not, may I load it? (A plain SET NX
# after the holder released its lease would hand out a second lease for a value that is
# already written.) Also returns the tag versions (KEYS[3..]) so the loader's result carries
# the versions read *before* it ran. ARGV[3] = '1': the value there is unusable, lease anyway.
_VALUE_OR_LEASE = """
local tags = {}
for i = 3, #KEYS do tags[#tags + 1] = redis.call('GET', KEYS[i]) end
if ARGV[3] ~= '1' then
  local v = redis.call('GET', KEYS[1])
  if v then return {1, v, tags} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, false, tags} end
return {0, false, tags}
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Invalidate and announce atomically: the sequence number and the message are one step, so a
# listener that sees seq N on the counter knows messages 1..N were all published before.
# KEYS: seq, version, then the targets; ARGV: channel, origin, kind, tag ttl, then the names.
_INVALIDATE = """
local seq = redis.call('INCR', KEYS[1])
local kind = ARGV[3]
local data = {}
if kind == 'k' then
  for i = 3, #KEYS do redis.call('DEL', KEYS[i]) end
  for i = 5, #ARGV do data[#data + 1] = ARGV[i] end
elseif kind == 't' then
  for i = 3, #KEYS do
    local v = redis.call('INCR', KEYS[i])
    redis.call('PEXPIRE', KEYS[i], ARGV[4])
    data[#data + 1] = ARGV[i + 2]
    data[#data + 1] = v
  end
elseif kind == 'c' then
  data[1] = redis.call('INCR', KEYS[2])
end
redis.call('PUBLISH', ARGV[1], cmsgpack.pack({seq, ARGV[2], kind, data}))
return {seq, data}
"""
# A batch load's writes in one command (issue 19: fifty pipelined SETs cost more CPU to pack
# and parse than the load itself). NX: a value another process wrote meanwhile wins — except
# over an entry this load replaces because it was past its TTL (mode 1: plain SET; with NX
# the expired entry would stay until max_stale and every batch would load the key again).
# KEYS: the entries; ARGV[1]: msgpack [blob, px, mode, ...] in KEYS' order (one argument to
# encode instead of a hundred and fifty).
_SET_MANY_NX = """
local args = cmsgpack.unpack(ARGV[1])
for i = 1, #KEYS do
  local j = 3 * i - 2
  if args[j + 2] == 1 then
    redis.call('SET', KEYS[i], args[j], 'PX', args[j + 1])
  else
    redis.call('SET', KEYS[i], args[j], 'PX', args[j + 1], 'NX')
  end
end
return #KEYS
"""
