"""The GCRA script: one EVALSHA decides a whole batch of requests (ADR 0006, 0012)."""

from __future__ import annotations

import hashlib

#: A *batch* of decisions in one script run, evaluated one after the other in arrival order
#: (each sees the TATs the previous ones wrote, exactly as if they had come one by one).
#: ARGV[1] is the whole batch as one MessagePack array (decoded by Redis' bundled cmsgpack,
#: in C; BullMQ's scripts rely on it too, so every Redis-compatible server has it):
#:   [1] now in µs, or 0 for Redis' own clock (one clock for every process of the fleet);
#:   [2] for each decision, its number of limits, then each limit's spec number:
#:       {2, 1, 2, 2, 1, 2} is two decisions of two limits each, specs 1 and 2;
#:   [3] the key of every limit, decision after decision;
#:   [4] the batch's distinct specs, five integers each: interval µs, period µs, cost,
#:       enforce (1, or 0 for a shadow policy), lease (units to take beyond the cost for
#:       the process's local lease, ADR 0028; 0 = exact, nothing extra).
#: One packed argument instead of KEYS and one argument per value: every argument costs the
#: client a packing step and the script a parse, and a spec that many decisions share is sent
#: once. Parsing text with Lua patterns cost the server ~2 µs per decision; the unpack is
#: ~0.1 µs (ADR 0012). A batch mixes many callers' keys anyway, so it
#: could never be routed by one key's slot (ADR 0006: one Redis, or one shard per limiter;
#: not Redis Cluster).
#: Returns ``{out, grants}``. ``out``: one integer per limit, TAT - now (µs, ≥ 0) as that
#: decision found it. ``grants``: flat pairs (limit number, units) for the limits of
#: *allowed* decisions that asked for a lease and got one: as many units as still fit
#: under the limit after the decision's own cost, at most the lease asked for (a lease is
#: never granted past the limit, so leasing itself never lets more through). Everything
#: else follows from it and the spec (``Check.allows``, ``Decision.from_script``): new TAT = TAT + interval × cost, the limit
#: allows when new TAT - now ≤ period, a decision is blocked when an enforced limit does not.
#: A key several decisions of the batch share (one caller's many requests) is read once and
#: written once, with the TAT the last of them left: Redis' own work per batch stays
#: proportional to distinct keys, not to decisions.
GCRA_LUA = """
local batch = cmsgpack.unpack(ARGV[1])
local now = batch[1]
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local numbers, keys, specs = batch[2], batch[3], batch[4]
local tats = {}      -- key -> its TAT as this batch left it (one GET per key per batch)
local written = {}   -- keys to SET at the end, in first-write order (one SET per key)
local dirty = {}
local out = {}       -- per limit: TAT - now, as its decision found it
local grants = {}    -- (limit number, units) of the leases granted
local new_tats = {}  -- per limit: the TAT it would leave, or false when it denies
local p, i, m = 1, 0, #numbers
while p <= m do
  local n = numbers[p]
  p = p + 1
  local first = i
  local blocked = false
  for _ = 1, n do
    i = i + 1
    local s = numbers[p] * 5
    p = p + 1
    local key = keys[i]
    local tat = tats[key]
    if tat == nil then
      tat = tonumber(redis.call('GET', key) or 0)
      tats[key] = tat
    end
    if tat < now then tat = now end
    out[i] = tat - now
    local interval, period = specs[s - 4], specs[s - 3]
    local new_tat = tat + interval * specs[s - 2]
    if new_tat - now <= period then
      local lease = specs[s]
      if lease > 0 then
        local extra = math.min(lease, math.floor((period - (new_tat - now)) / interval))
        if extra > 0 then
          new_tat = new_tat + interval * extra
          grants[#grants + 1] = i
          grants[#grants + 1] = extra
        end
      end
      new_tats[i] = new_tat
    else
      new_tats[i] = false
      if specs[s - 1] == 1 then blocked = true end
    end
  end
  if blocked then  -- a denied decision spends nothing, and leases nothing
    while #grants > 0 and grants[#grants - 1] > first do
      grants[#grants] = nil
      grants[#grants] = nil
    end
  else
    for k = first + 1, i do
      local new_tat = new_tats[k]
      if new_tat and new_tat > now then
        local key = keys[k]
        tats[key] = new_tat
        if not dirty[key] then
          dirty[key] = true
          written[#written + 1] = key
        end
      end
    end
  end
end
for _, key in ipairs(written) do
  local tat = tats[key]
  redis.call('SET', key, string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
end
return {out, grants}
"""
GCRA_SHA = hashlib.sha1(GCRA_LUA.encode()).hexdigest()
_EVALSHA = (b"EVALSHA", GCRA_SHA.encode(), b"0")
