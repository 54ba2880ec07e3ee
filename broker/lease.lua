-- lease.lua: write (or renew) one consumer's lease, atomically. upbit-broker's own client
-- library runs this very file; a consumer in any language may run it the same way:
--
--   redis-cli --eval lease.lua upbit:lease:ID upbit:leases , ID TTL_MS SUBS HOST PID
--
-- KEYS[1]  the lease hash {ns}:lease:ID     KEYS[2]  the index {ns}:leases
-- ARGV     ID      the client id: letters, digits, '.', '_', '-' (first a letter or digit),
--                  at most 128 characters
--          TTL_MS  the lease's lifetime in ms (an integer > 0); run this again every TTL_MS/3
--          SUBS    JSON {stream: [codes]}, e.g. {"ticker":["KRW-BTC"],"orderbook":["KRW-ETH.5"]}
--          HOST    any text naming the holder's machine
--          PID     an integer (the holder's process id)
--
-- Replaces the whole hash (so no stray field survives), keeps created_ms of a lease that is
-- already there, takes every *_ms from the Redis server clock, sets the key's expiry, indexes
-- the deadline and publishes "lease ID" on {ns}:control so the broker reads it at once.
-- Returns {renewed_ms, created_ms, deadline_ms}. Needs Redis >= 5 (TIME before writing relies
-- on effect replication, the default since 5).
local id, ttl, subs, host, pid = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local usage = 'usage: --eval lease.lua {ns}:lease:ID {ns}:leases , ID TTL_MS SUBS HOST PID'
if #KEYS ~= 2 or #ARGV ~= 5 then return redis.error_reply(usage) end
local ns = string.match(KEYS[2], '^(.+):leases$')
if not ns then return redis.error_reply('KEYS[2] must be {ns}:leases; ' .. usage) end
if #id > 128 or not string.match(id, '^[%w][%w%._%-]*$') then
  return redis.error_reply("invalid client id: use letters, digits, '.', '_' or '-'")
end
if KEYS[1] ~= ns .. ':lease:' .. id then
  return redis.error_reply('KEYS[1] must be ' .. ns .. ':lease:' .. id)
end
if not string.match(ttl, '^[1-9][0-9]*$') or #ttl > 15 then
  return redis.error_reply('TTL_MS must be an integer > 0')
end
local digits = string.match(pid, '^%-?([0-9]+)$')
if not digits or #digits > 19 then return redis.error_reply('PID must be an integer') end
if not string.match(subs, '^%s*{') or not pcall(cjson.decode, subs) then
  return redis.error_reply('SUBS must be a JSON object {stream: [codes]}')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = now + tonumber(ttl)
-- pcall: a key of another type (written by hand) is replaced, not an error
local created = tonumber(redis.pcall('HGET', KEYS[1], 'created_ms') or '')
if not created or created ~= created or created < 0 or created > now then created = now end
local function ms(x) return string.format('%.0f', x) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', '1', 'client_id', id, 'host', host, 'pid', pid,
  'subs', subs, 'ttl_ms', ttl,
  'created_ms', ms(created), 'renewed_ms', ms(now), 'deadline_ms', ms(deadline))
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], ms(deadline), id)
redis.call('PUBLISH', ns .. ':control', 'lease ' .. id)
return {now, created, deadline}
