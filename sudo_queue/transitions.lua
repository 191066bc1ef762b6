-- Every state transition of a request, as one atomic step (DESIGN.md's state machine).
-- Each call checks the current status, writes the new one, appends the audit entry,
-- enqueues any follow-up arq job and publishes the wake-up, all inside this script.
-- Validation happens before the first write: a Lua error after a write keeps that write.
--
-- KEYS: 1 request hash, 2 votes set, 3 idempotency key ('' when none), 4 queued zset,
--       5 pending zset, 6 arq queue zset, 7 audit stream, 8 audit head hash, 9 policy hash
-- ARGV: 1 operation, 2 JSON parameters, 3 request-key prefix, 4 channel prefix,
--       5 arq job-key prefix, 6 arq in-progress-key prefix, 7 audit max length ('0' = unbounded),
--       8 audit HMAC pad states ('' = plain SHA-256), 9 the redaction key patterns (JSON list)
--       the caller redacted with
local op = ARGV[1]
local p = cjson.decode(ARGV[2])
local req_prefix, chan_prefix, job_prefix, progress_prefix = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local audit_maxlen = tonumber(ARGV[7])
local audit_mac, redact_used = ARGV[8] or '', ARGV[9] or '[]'
local req, votes, idem, queued, pending, queue, audit_key, head_key, policy_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = string.sub(req, #req_prefix + 1)
local DAY_MS = 86400000

local FIELDS = {'status', 'agent', 'resource', 'action', 'args_digest', 'expires_at',
  'min_approvals', 'notify', 'retention_ms', 'idem', 'rule', 'policy_version', 'args', 'context',
  'args_redacted', 'redacted_digest', 'redact', 'inbox'}

local function load()
  local values = redis.call('HMGET', req, unpack(FIELDS))
  if not values[1] then return nil end
  local rec = {}
  for i = 1, #FIELDS do rec[FIELDS[i]] = values[i] or '' end
  return rec
end

local function enqueue(job_queue, job_id, fn, args, score)
  local job_key = job_prefix .. job_id
  if redis.call('EXISTS', job_key) == 1 then return end
  -- arq 0.28's job format, JSON-serialized (the worker never unpickles). Written by hand
  -- because cjson cannot be told that an empty table is an object ("k" must be {}).
  local payload = '{"t":1,"f":' .. cjson.encode(fn) .. ',"a":' .. cjson.encode(args)
    .. ',"k":{},"et":' .. string.format('%d', now) .. '}'
  redis.call('SET', job_key, payload, 'PX', math.max(score - now, 0) + DAY_MS)
  redis.call('ZADD', job_queue, score, job_id)
  -- Wake a worker blocked on BLPOP instead of letting it sleep through its poll delay; for a
  -- deferred job (an expiry) the worker learns when it is due and blocks until then.
  -- Bounded: a token only means "look at the queue now", so more than a few are noise.
  local wake = job_queue .. ':wake'
  if redis.call('LPUSH', wake, '1') > 16 then redis.call('LTRIM', wake, 0, 15) end
end

-- The redacted args' digest rides along so that the worker can pass its decision entry's body
-- digest without redacting the args again (a hint only: see append_entry).
local function eval_job(rec)
  enqueue(queue, 'sq-eval:' .. id, 'evaluate',
    {id, rec.agent, rec.resource, rec.action, rec.args, rec.context, rec.args_digest,
      rec.redacted_digest}, now)
end

-- The audit chain (sudo_queue/audit.py verifies it; docs/audit.md is the contract). Format 2:
--   hash_n = H(raw(hash_{n-1}) .. raw(body_n) .. u64(seq_n) .. u64(time_n))
--   body_n = SHA-256(canonical(entry_n))
-- with H = SHA-256, or HMAC-SHA-256 when the caller holds SUDO_QUEUE_AUDIT_KEY, and
-- canonical(entry) the netstrings ('<byte length>:<value>,') of the BODY fields in this order.
-- It is computed here, inside the transition, so that the entry and the transition are one
-- atomic step and concurrent writers from any number of processes extend one chain. The chain
-- step is two SHA-256 blocks whatever the entry holds; the body costs more (a block per 64
-- bytes), so a caller that knows the entry passes its digest in `p.bodies`, keyed by the
-- canonical bytes: it is used only for exactly the bytes built here, never trusted otherwise.
local CANON = {'v', 'seq', 'event', 'request_id', 'agent', 'resource', 'action', 'args_digest',
  'redacted_digest', 'status', 'rule', 'policy_version', 'actor', 'reason', 'time', 'alg'}
local BODY = {'v', 'event', 'request_id', 'agent', 'resource', 'action', 'args_digest',
  'redacted_digest', 'status', 'rule', 'policy_version', 'actor', 'reason', 'alg'}
local GENESIS = string.rep('0', 64)
local AUDIT_REASON_MAX = 1024
-- At most this many old entries are trimmed per transition, so lowering the max length of a
-- long stream never blocks Redis for long; the stream converges over the next transitions.
local TRIM_BATCH = 100

-- [sha256 begin] (tests/test_audit.py runs this block on its own against hashlib and hmac)
-- SHA-256 (FIPS 180-4) in pure Lua 5.1: Redis's Lua has no SHA-2. Real Redis has the `bit`
-- library (LuaBitOp: it reduces any input mod 2^32 and returns signed 32-bit results); where it
-- is missing (fakeredis's Lua) the same operations are done arithmetically on 0 <= x < 2^32.
local sha256_from, chain_from, digest_from, words_hex
do
  local K = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2}
  local M32 = 4294967296
  local band, bxor
  if type(bit) == 'table' then
    band, bxor = bit.band, bit.bxor
  else
    local NX = {}  -- NX[a * 16 + b] = a xor b, for 4-bit a and b
    for a = 0, 15 do
      for b = 0, 15 do
        local r, q, x, y = 0, 1, a, b
        for _ = 1, 4 do
          if x % 2 ~= y % 2 then r = r + q end
          x, y, q = (x - x % 2) / 2, (y - y % 2) / 2, q * 2
        end
        NX[a * 16 + b] = r
      end
    end
    local function xor2(a, b)
      local r, q = 0, 1
      for _ = 1, 8 do
        local x, y = a % 16, b % 16
        r = r + NX[x * 16 + y] * q
        a, b, q = (a - x) / 16, (b - y) / 16, q * 16
      end
      return r
    end
    bxor = function(a, b, c)
      if c then return xor2(xor2(a, b), c) end
      return xor2(a, b)
    end
    band = function(a, b) return (a + b - xor2(a, b)) / 2 end  -- a + b = (a xor b) + 2(a and b)
  end

  -- One compression of the block whose 16 words are W[1..16] into the state H (W is clobbered).
  -- Library calls are most of the cost, so each round makes as few as it can (5, not the
  -- textbook's 17), on words kept in 0 <= x < 2^32 (a sum of them is exact in a double):
  --   a rotation is arithmetic: ror(x, n) = (x mod 2^n) * 2^(32-n) + (x - x mod 2^n) / 2^n, and a
  --     shift (x - x mod 2^n) / 2^n, so each Sigma and sigma is one three-way bxor;
  --   Ch(e,f,g) = (e and f) + ((not e) and g): the two have no bit in common, and not e is
  --     2^32 - 1 - e;
  --   Maj(a,b,c) = (a + b + c - (a xor b xor c)) / 2: per bit, a + b + c is the xor plus
  --     twice the majority (a full adder's sum and carry).
  -- bxor may return a negative number (LuaBitOp's signed results): each result only enters a
  -- sum that is reduced mod 2^32.
  local function compress_words(H, W)
    for j = 17, 64 do
      local x, y = W[j - 15], W[j - 2]
      local x7, x18, x3 = x % 128, x % 262144, x % 8
      local y17, y19, y10 = y % 131072, y % 524288, y % 1024
      W[j] = (W[j - 16] + W[j - 7]
        + bxor(x7 * 33554432 + (x - x7) / 128, x18 * 16384 + (x - x18) / 262144, (x - x3) / 8)
        + bxor(y17 * 32768 + (y - y17) / 131072, y19 * 8192 + (y - y19) / 524288,
          (y - y10) / 1024)) % M32
    end
    local a, b, c, d, e, f, g, h = H[1], H[2], H[3], H[4], H[5], H[6], H[7], H[8]
    for j = 1, 64 do
      local e6, e11, e25 = e % 64, e % 2048, e % 33554432
      local a2, a13, a22 = a % 4, a % 8192, a % 4194304
      local t1 = h + bxor(e6 * 67108864 + (e - e6) / 64, e11 * 2097152 + (e - e11) / 2048,
          e25 * 128 + (e - e25) / 33554432)
        + band(e, f) + band(4294967295 - e, g) + K[j] + W[j]
      local t2 = bxor(a2 * 1073741824 + (a - a2) / 4, a13 * 524288 + (a - a13) / 8192,
          a22 * 1024 + (a - a22) / 4194304)
        + (a + b + c - bxor(a, b, c) % M32) / 2
      h, g, f, e = g, f, e, (d + t1) % M32
      d, c, b, a = c, b, a, (t1 + t2) % M32
    end
    H[1], H[2], H[3], H[4] = (H[1] + a) % M32, (H[2] + b) % M32, (H[3] + c) % M32, (H[4] + d) % M32
    H[5], H[6], H[7], H[8] = (H[5] + e) % M32, (H[6] + f) % M32, (H[7] + g) % M32, (H[8] + h) % M32
  end

  local function compress(H, s, pos, W)
    for j = 1, 16 do
      local a, b, c, d = string.byte(s, pos, pos + 3)
      W[j] = ((a * 256 + b) * 256 + c) * 256 + d
      pos = pos + 4
    end
    compress_words(H, W)
  end

  local function hex_out(H)
    local out = {}
    for j = 1, 8 do out[j] = string.format('%08x', H[j] % M32) end
    return table.concat(out)
  end

  local function put_hex(W, at, hex)  -- 64 hex digits as the 8 words W[at..at+7]
    for j = 0, 7 do W[at + j] = tonumber(string.sub(hex, j * 8 + 1, j * 8 + 8), 16) end
  end

  -- The chain step H(prev || body || u64(seq) || u64(time)) (80 bytes: two blocks), from the
  -- state `init` after `done` bytes (see sha256_from), computed on words: prev and body (hex)
  -- fill the first block, and the second is seq, time and the padding.
  chain_from = function(init, done, prev, body, seq, time)
    local H = {init[1], init[2], init[3], init[4], init[5], init[6], init[7], init[8]}
    local W = {}
    put_hex(W, 1, prev)
    put_hex(W, 9, body)
    compress_words(H, W)
    local seq_low, time_low = seq % M32, time % M32
    W[1], W[2], W[3], W[4] = (seq - seq_low) / M32, seq_low, (time - time_low) / M32, time_low
    W[5] = 0x80000000
    for j = 6, 15 do W[j] = 0 end
    W[16] = (done + 80) * 8
    compress_words(H, W)
    return H
  end

  -- The SHA-256 of a 32-byte digest (its 8 words) from the state `init` after `done` bytes:
  -- HMAC's outer hash, one block.
  digest_from = function(init, done, words)
    local H = {init[1], init[2], init[3], init[4], init[5], init[6], init[7], init[8]}
    local W = {words[1], words[2], words[3], words[4], words[5], words[6], words[7], words[8],
      0x80000000, 0, 0, 0, 0, 0, 0, (done + 32) * 8}
    compress_words(H, W)
    return H
  end
  words_hex = hex_out

  -- The SHA-256 of `msg` continued from the state `init` after `done` bytes (0 and the initial
  -- state for plain SHA-256; 64 and a key's pad state for HMAC), as 64 hex digits.
  sha256_from = function(init, done, msg)
    local H = {init[1], init[2], init[3], init[4], init[5], init[6], init[7], init[8]}
    local bits = (#msg + done) * 8
    local zeros = (55 - #msg) % 64
    local len = {}
    for j = 8, 1, -1 do
      local byte = bits % 256
      len[j] = string.char(byte)
      bits = (bits - byte) / 256
    end
    local s = msg .. '\128' .. string.rep('\0', zeros) .. table.concat(len)
    local W = {}
    for pos = 1, #s, 64 do compress(H, s, pos, W) end
    return hex_out(H)
  end
end

local SHA256_INIT = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c,
  0x1f83d9ab, 0x5be0cd19}

local function hex_words(hex)
  local w = {}
  for j = 1, 8 do w[j] = tonumber(string.sub(hex, j * 8 - 7, j * 8), 16) end
  return w
end

-- The audit chain step: SHA-256 of raw(prev) .. raw(body) .. u64(seq) .. u64(time), computed
-- on words (see chain_from); prev and body are 64 hex digits, seq and time integers. Or
-- HMAC-SHA-256 when the caller passed the key's pad states: the states after hashing (key xor
-- ipad) and (key xor opad), 128 hex digits, so the key itself never reaches Redis and each entry
-- saves two compressions.
local function chain_step(prev, body, seq, time)
  if audit_mac == '' then return words_hex(chain_from(SHA256_INIT, 0, prev, body, seq, time)) end
  local inner = chain_from(hex_words(string.sub(audit_mac, 1, 64)), 64, prev, body, seq, time)
  return words_hex(digest_from(hex_words(string.sub(audit_mac, 65, 128)), 64, inner))
end
-- [sha256 end]

local function clip(s, n)  -- at most n bytes, never splitting a UTF-8 sequence
  if #s <= n then return s end
  local cut = n
  while cut > 0 do
    local b = string.byte(s, cut + 1)
    if b < 128 or b >= 192 then break end  -- byte cut + 1 starts a character
    cut = cut - 1
  end
  return string.sub(s, 1, cut) .. '...'
end

local function trim_audit()
  if audit_maxlen <= 0 then return end
  local excess = redis.call('XLEN', audit_key) - audit_maxlen
  if excess <= 0 then return end
  local old = redis.call('XRANGE', audit_key, '-', '+', 'COUNT', math.min(excess, TRIM_BATCH))
  local last = old[#old]
  local anchor = {anchor_id = last[1], anchor_hash = '', anchor_count = ''}
  for i = 1, #last[2], 2 do
    local name = last[2][i]
    if name == 'hash' then anchor.anchor_hash = last[2][i + 1] end
    if name == 'seq' then anchor.anchor_count = last[2][i + 1] end
  end
  -- The anchor is the hash and position of the last trimmed entry: `verify` starts from it.
  redis.call('HSET', head_key, 'anchor_hash', anchor.anchor_hash,
    'anchor_count', anchor.anchor_count, 'anchor_id', anchor.anchor_id)
  local ms, n = string.match(last[1], '^(%d+)-(%d+)$')
  redis.call('XTRIM', audit_key, 'MINID', ms .. '-' .. string.format('%d', tonumber(n) + 1))
end

-- Append one entry (a table of CANON values plus `args`) to the chain.
local function append_entry(e)
  local head = redis.call('HMGET', head_key, 'hash', 'count')
  local prev = head[1] or GENESIS
  local seq = (tonumber(head[2]) or 0) + 1
  e.v, e.seq, e.time = '2', string.format('%d', seq), string.format('%d', now)
  e.alg = audit_mac == '' and 'sha256' or 'hmac-sha256'
  e.reason = clip(e.reason or '', AUDIT_REASON_MAX)
  -- (Numeric loops and one concat: ipairs and a string per field cost more in Lua 5.1.)
  local parts, fields = {}, {}
  for i = 1, #BODY do
    local value = e[BODY[i]] or ''
    local at = 4 * i
    parts[at - 3], parts[at - 2], parts[at - 1], parts[at] = #value, ':', value, ','
  end
  for i = 1, #CANON do
    local name = CANON[i]
    fields[2 * i - 1], fields[2 * i] = name, e[name] or ''
  end
  local canonical = table.concat(parts)
  local body = type(p.bodies) == 'table' and p.bodies[canonical]
  if type(body) ~= 'string' or #body ~= 64 or string.find(body, '[^%x]') then
    body = sha256_from(SHA256_INIT, 0, canonical)
  end
  local hash = chain_step(prev, body, seq, now)
  local n = #fields
  fields[n + 1], fields[n + 2], fields[n + 3], fields[n + 4] = 'args', e.args or '', 'prev', prev
  fields[n + 5], fields[n + 6] = 'hash', hash
  redis.call('XADD', audit_key, '*', unpack(fields))
  redis.call('HSET', head_key, 'hash', hash, 'count', seq)
  trim_audit()
end

local function audit(rec, event, status, actor, reason)
  append_entry({event = event, request_id = id, agent = rec.agent, resource = rec.resource,
    action = rec.action, args_digest = rec.args_digest, redacted_digest = rec.redacted_digest,
    args = rec.args_redacted, status = status, rule = rec.rule,
    policy_version = rec.policy_version, actor = actor or '', reason = reason or ''})
end

local function notify(rec, status)
  if rec.notify == '' then return end
  for _, target in ipairs(cjson.decode(rec.notify)) do
    enqueue(target[1], 'sq-notify:' .. target[2] .. ':' .. id .. ':' .. status, target[2],
      {id, status}, now)
  end
end

-- The wake-up. On the request's channel (anyone waiting for it): the new status, plain. On the
-- inbox of the Gate that created the request, if it gave one: '<request id> <JSON object>'. The
-- id routes it to the waiting coroutine (sudo_queue/multiplexer.py); the object carries what
-- that coroutine returns, so that it need not read the record (sudo_queue/gate.py): the
-- WAKE_FIELDS exactly as the record now holds them, as strings, a field absent when unset. They
-- are read back rather than taken from the caller, so that the message says what a read would
-- (an approval without a reason keeps the policy's). No args, not even redacted ones. A message
-- over WAKE_MAX_BYTES (a long reason) is the id alone, which makes the waiter read the record,
-- as any message it cannot use does.
local WAKE_FIELDS = {'status', 'args_digest', 'rule', 'reason', 'decided_by', 'decided_at',
  'expires_at'}
local WAKE_MAX_BYTES = 2048
local function wake_up(rec, status)
  redis.call('PUBLISH', chan_prefix .. id, status)
  if rec.inbox == '' then return end
  local values = redis.call('HMGET', req, unpack(WAKE_FIELDS))
  local news = {}
  for i = 1, #WAKE_FIELDS do
    if values[i] then news[WAKE_FIELDS[i]] = values[i] end
  end
  local message = id .. ' ' .. cjson.encode(news)
  if #message > WAKE_MAX_BYTES then message = id end
  redis.call('PUBLISH', rec.inbox, message)
end

local function finish(rec, status, actor, reason)
  redis.call('HSET', req, 'status', status, 'decided_at', now, 'decided_by', actor)
  if reason and reason ~= '' then redis.call('HSET', req, 'reason', reason) end
  -- A queued request is in the queued set only; a pending one has its expiry job and votes.
  local was_queued = rec.status == 'queued'
  if was_queued then
    redis.call('ZREM', queued, id)
  else
    redis.call('ZREM', pending, id)
    local expire_job = 'sq-expire:' .. id
    redis.call('ZREM', queue, expire_job)
    redis.call('DEL', job_prefix .. expire_job)
  end
  local retention = tonumber(rec.retention_ms)
  if retention and retention > 0 then
    redis.call('PEXPIRE', req, retention)
    if not was_queued then redis.call('PEXPIRE', votes, retention) end
    if rec.idem ~= '' then redis.call('PEXPIRE', rec.idem, retention) end
  end
  notify(rec, status)
  audit(rec, status, status, actor, reason)
  wake_up(rec, status)
  return {'applied', status}
end

local function expire_now(rec)
  return finish(rec, 'expired', 'sudo-queue', 'no decision before the deadline')
end

-- Redaction key patterns come from the policy file, which only the workers read; they publish
-- them in the policy hash. A caller that redacted with other patterns is told the current ones
-- (and, for an existing request, its args) and calls again, so every entry is redacted with the
-- patterns in force when it is written, whichever process writes it.
local published_redact = redis.call('HGET', policy_key, 'redact') or '[]'

if op == 'policy' then
  -- A worker's policy: publish its version and redaction patterns; an entry when they change.
  local current = redis.call('HMGET', policy_key, 'version', 'redact')
  if current[1] == p.version and published_redact == p.redact then
    return {'refused', 'unchanged'}
  end
  redis.call('HSET', policy_key, 'version', p.version, 'redact', p.redact, 'source', p.source,
    'updated_at', now, 'updated_by', p.actor)
  local reason = 'policy ' .. p.version .. ' from ' .. p.source .. ' replaces '
    .. (current[1] or 'none') .. '; redacted keys: ' .. p.redact
  append_entry({event = 'policy_reloaded', policy_version = p.version, actor = p.actor,
    reason = reason})
  return {'applied', 'policy', current[1] or ''}
end

if op == 'create' then
  if idem ~= '' then
    local existing = redis.call('GET', idem)
    if existing then
      local other = redis.call('HMGET', req_prefix .. existing, 'args_digest', 'status',
        'resource', 'action')
      if other[1] then return {'exists', existing, other[1], other[2], other[3], other[4]} end
    end
  end
  if redis.call('EXISTS', req) == 1 then return {'refused', 'exists'} end
  if redact_used ~= published_redact then return {'redact', published_redact} end
  redis.call('HSET', req, 'id', id, 'agent', p.agent, 'resource', p.resource, 'action', p.action,
    'args', p.args, 'args_digest', p.digest, 'key', p.key, 'context', p.context,
    'status', 'queued', 'created_at', now, 'retention_ms', p.retention_ms, 'idem', idem,
    'args_redacted', p.args_redacted, 'redacted_digest', p.redacted_digest,
    'redact', redact_used, 'inbox', p.inbox or '')
  if idem ~= '' then redis.call('SET', idem, id) end
  redis.call('ZADD', queued, now, id)
  -- The record just written, as load() would read it back (every value above is a string).
  local rec = {status = 'queued', agent = p.agent, resource = p.resource, action = p.action,
    args_digest = p.digest, args = p.args, context = p.context, idem = idem,
    args_redacted = p.args_redacted, redacted_digest = p.redacted_digest, redact = redact_used,
    inbox = p.inbox or '', retention_ms = tostring(p.retention_ms), expires_at = '',
    min_approvals = '', notify = '', rule = '', policy_version = ''}
  eval_job(rec)
  audit(rec, 'created', 'queued', p.agent, '')
  return {'created', id}
end

local rec = load()
if not rec then return {'missing'} end

if (rec.status == 'queued' or rec.status == 'pending') and rec.redact ~= published_redact then
  -- This request's stored redaction is stale (the patterns changed since it was created).
  if redact_used ~= published_redact or not p.redacted_digest then
    return {'redact', published_redact, rec.args}
  end
  redis.call('HSET', req, 'args_redacted', p.args_redacted, 'redacted_digest', p.redacted_digest,
    'redact', redact_used)
  rec.args_redacted, rec.redacted_digest = p.args_redacted, p.redacted_digest
end

if op == 'decide' then
  if rec.status ~= 'queued' then return {'refused', rec.status} end
  if rec.agent ~= p.agent or rec.resource ~= p.resource or rec.action ~= p.action
      or rec.args_digest ~= p.digest then
    return {'refused', rec.status, 'the job does not match the stored request'}
  end
  redis.call('HSET', req, 'rule', p.rule, 'reason', p.reason, 'policy_version', p.policy_version)
  rec.rule, rec.policy_version = p.rule, p.policy_version
  if p.verdict ~= 'pending' then return finish(rec, p.verdict, p.actor, p.reason) end
  local deadline = now + tonumber(p.expires_in_ms)
  redis.call('HSET', req, 'status', 'pending', 'expires_at', deadline, 'approvers', p.approvers,
    'min_approvals', p.min_approvals, 'channel', p.channel, 'notify', p.notify)
  rec.notify = p.notify
  redis.call('ZREM', queued, id)
  redis.call('ZADD', pending, deadline, id)
  enqueue(queue, 'sq-expire:' .. id, 'expire', {id}, deadline)
  notify(rec, 'pending')
  audit(rec, 'pending', 'pending', p.actor, p.reason)
  wake_up(rec, 'pending')
  return {'applied', 'pending'}
end

if op == 'requeue' then
  if rec.status ~= 'queued' then return {'refused', rec.status} end
  local job_id = 'sq-eval:' .. id
  if redis.call('EXISTS', job_prefix .. job_id) == 1
      or redis.call('EXISTS', progress_prefix .. job_id) == 1 then
    return {'refused', 'queued', 'its evaluation job is still there'}
  end
  -- A job that keeps vanishing (it crashes the worker process, or is refused as undecodable)
  -- must not loop forever: after a few recoveries the request is denied, fail closed.
  if redis.call('HINCRBY', req, 'requeues', 1) > tonumber(p.max_requeues) then
    redis.call('HSET', req, 'rule', '<error>')
    rec.rule = '<error>'
    return finish(rec, 'denied', p.actor,
      'its evaluation never completed after ' .. p.max_requeues .. ' recoveries; denied')
  end
  eval_job(rec)
  return {'applied', 'queued'}
end

if op == 'cancel' then
  if rec.status ~= 'queued' and rec.status ~= 'pending' then return {'refused', rec.status} end
  return finish(rec, 'cancelled', p.actor, p.reason)
end

if op == 'fail' then
  -- The evaluation could not complete (poison job): deny, fail closed.
  if rec.status ~= 'queued' then return {'refused', rec.status} end
  redis.call('HSET', req, 'rule', p.rule)
  rec.rule = p.rule
  return finish(rec, 'denied', p.actor, p.reason)
end

if rec.status ~= 'pending' then return {'refused', rec.status} end
local late = now >= tonumber(rec.expires_at)

if op == 'expire' then
  if not late then return {'not_due', tostring(tonumber(rec.expires_at) - now)} end
  return expire_now(rec)
end

if late then
  expire_now(rec)
  return {'refused', 'expired', 'the deadline had passed'}
end

if op == 'approve' then
  if p.digest ~= '' and p.digest ~= rec.args_digest then
    return {'refused', 'pending', 'the args changed since the approver saw them'}
  end
  if p.actor == rec.agent then
    return {'refused', 'pending', 'an agent cannot approve its own request'}
  end
  if redis.call('SADD', votes, p.actor) == 0 then
    return {'duplicate', tostring(redis.call('SCARD', votes)), rec.min_approvals}
  end
  local count = redis.call('SCARD', votes)
  audit(rec, 'vote', 'pending', p.actor, p.reason)
  if count >= tonumber(rec.min_approvals) then
    return finish(rec, 'approved', p.actor, p.reason)
  end
  wake_up(rec, 'pending')
  return {'voted', tostring(count), rec.min_approvals}
end

if op == 'reject' then
  local reason = p.reason
  if reason == '' then reason = 'rejected by ' .. p.actor end
  return finish(rec, 'rejected', p.actor, reason)
end

return redis.error_reply('unknown operation ' .. tostring(op))
