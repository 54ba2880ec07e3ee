-- lease_release.lua: give a lease up at once (else it expires after its TTL). upbit-broker's
-- client library runs this very file; any consumer may run it the same way:
--
--   redis-cli --eval lease_release.lua upbit:lease:ID upbit:leases , ID
--
-- Deletes the hash, drops ID from the index and always publishes "release ID" on
-- {ns}:control. Returns 1 when there was something to remove, else 0.
local id = ARGV[1]
local usage = 'usage: --eval lease_release.lua {ns}:lease:ID {ns}:leases , ID'
if #KEYS ~= 2 or #ARGV ~= 1 then return redis.error_reply(usage) end
local ns = string.match(KEYS[2], '^(.+):leases$')
if not ns then return redis.error_reply('KEYS[2] must be {ns}:leases; ' .. usage) end
if KEYS[1] ~= ns .. ':lease:' .. id then
  return redis.error_reply('KEYS[1] must be ' .. ns .. ':lease:' .. id)
end
local gone = redis.call('DEL', KEYS[1]) + redis.call('ZREM', KEYS[2], id)
redis.call('PUBLISH', ns .. ':control', 'release ' .. id)
if gone > 0 then return 1 end
return 0
