"""The Lua scripts the shared state runs in Redis: merges that keep the newer value, a lock release.

A stored value that does not decode (a malformed field) is treated as absent and overwritten, so
it never fails a write (a failing write would make the worker reconnect and resync, again and
again).
"""

# Write a hash field only if the new value is newer: by `t` (marks, breakers) or by the later
# expiry (cooldowns: `until`, pins: `expires`). Returns 1 if written.
MERGE = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local ok, doc = pcall(cjson.decode, cur)
  if ok and type(doc) == 'table' then
    local old = tonumber(doc[ARGV[3]]) or 0
    local new = tonumber(cjson.decode(ARGV[2])[ARGV[3]]) or 0
    if old >= new then return 0 end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
# marks merge field-wise (selector.merge_marks): the newer change wins, but a dead mark stays
# until the key was revived after it
MERGE_MARKS = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local ok, a = false, nil
if cur then ok, a = pcall(cjson.decode, cur) end
if not ok or type(a) ~= 'table' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) return 1 end
local b = cjson.decode(ARGV[2])
local function num(x) if type(x) == 'number' then return x end return 0 end
local function marked(x) return (x['dead'] and x['dead'] ~= cjson.null) or (x['suspect'] and x['suspect'] ~= cjson.null) end
local new, old = a, b
if num(b['t']) > num(a['t']) then new, old = b, a end
local out = {}
for k, v in pairs(old) do out[k] = v end
for k, v in pairs(new) do out[k] = v end
local dead_at = math.max(num(new['dead_at']), num(old['dead_at']))
local revived_at = math.max(num(new['revived_at']), num(old['revived_at']))
out['dead_at'] = dead_at
out['revived_at'] = revived_at
if (not marked(new)) and marked(old) and num(old['dead_at']) > revived_at then
  for _, f in ipairs({'dead', 'suspect', 'next_check', 'backoff'}) do out[f] = old[f] end
end
local enc = cjson.encode(out)
if enc == cur then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], enc)
return 1
"""
# a probe grant ends with the probe (the breaker closed or opened again): free it if it is ours
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
