-- Every state transition of a request, as one atomic step (DESIGN.md's state machine).
-- Each call checks the current status, writes the new one, appends the audit entry,
-- enqueues any follow-up arq job and publishes the wake-up, all inside this script.
-- Validation happens before the first write: a Lua error after a write keeps that write.
--
-- KEYS: 1 request hash, 2 votes set, 3 idempotency key ('' when none), 4 queued zset,
--       5 pending zset, 6 arq queue zset, 7 audit stream
-- ARGV: 1 operation, 2 JSON parameters, 3 request-key prefix, 4 channel prefix,
--       5 arq job-key prefix, 6 arq in-progress-key prefix, 7 audit max length ('0' = unbounded)
local op = ARGV[1]
local p = cjson.decode(ARGV[2])
local req_prefix, chan_prefix, job_prefix, progress_prefix = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local audit_maxlen = tonumber(ARGV[7])
local req, votes, idem, queued, pending, queue, audit_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = string.sub(req, #req_prefix + 1)
local DAY_MS = 86400000

local FIELDS = {'status', 'agent', 'resource', 'action', 'args_digest', 'expires_at',
  'min_approvals', 'notify', 'retention_ms', 'idem', 'rule', 'policy_version', 'args', 'context'}

local function load()
  local values = redis.call('HMGET', req, unpack(FIELDS))
  if not values[1] then return nil end
  local rec = {}
  for i, name in ipairs(FIELDS) do rec[name] = values[i] or '' end
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
  if score <= now then
    -- Wake a worker blocked on BLPOP instead of letting it sleep through its poll delay.
    -- Bounded: a token only means "look at the queue now", so more than a few are noise.
    local wake = job_queue .. ':wake'
    redis.call('LPUSH', wake, '1')
    redis.call('LTRIM', wake, 0, 15)
  end
end

local function eval_job(rec)
  enqueue(queue, 'sq-eval:' .. id, 'evaluate',
    {id, rec.agent, rec.resource, rec.action, rec.args, rec.context, rec.args_digest}, now)
end

local function audit(rec, event, status, actor, reason)
  local entry = {'event', event, 'request_id', id, 'agent', rec.agent, 'resource', rec.resource,
    'action', rec.action, 'args_digest', rec.args_digest, 'status', status, 'rule', rec.rule,
    'policy_version', rec.policy_version, 'actor', actor or '', 'reason', reason or '',
    'time', tostring(now)}
  if audit_maxlen > 0 then
    redis.call('XADD', audit_key, 'MAXLEN', '~', audit_maxlen, '*', unpack(entry))
  else
    redis.call('XADD', audit_key, '*', unpack(entry))
  end
end

local function notify(rec, status)
  if rec.notify == '' then return end
  for _, target in ipairs(cjson.decode(rec.notify)) do
    enqueue(target[1], 'sq-notify:' .. target[2] .. ':' .. id .. ':' .. status, target[2],
      {id, status}, now)
  end
end

local function finish(rec, status, actor, reason)
  redis.call('HSET', req, 'status', status, 'decided_at', now, 'decided_by', actor)
  if reason and reason ~= '' then redis.call('HSET', req, 'reason', reason) end
  redis.call('ZREM', queued, id)
  redis.call('ZREM', pending, id)
  local expire_job = 'sq-expire:' .. id
  redis.call('ZREM', queue, expire_job)
  redis.call('DEL', job_prefix .. expire_job)
  local retention = tonumber(rec.retention_ms)
  if retention and retention > 0 then
    redis.call('PEXPIRE', req, retention)
    redis.call('PEXPIRE', votes, retention)
    if rec.idem ~= '' then redis.call('PEXPIRE', rec.idem, retention) end
  end
  notify(rec, status)
  audit(rec, status, status, actor, reason)
  redis.call('PUBLISH', chan_prefix .. id, status)
  return {'applied', status}
end

local function expire_now(rec)
  return finish(rec, 'expired', 'sudo-queue', 'no decision before the deadline')
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
  redis.call('HSET', req, 'id', id, 'agent', p.agent, 'resource', p.resource, 'action', p.action,
    'args', p.args, 'args_digest', p.digest, 'key', p.key, 'context', p.context,
    'status', 'queued', 'created_at', now, 'retention_ms', p.retention_ms, 'idem', idem)
  if idem ~= '' then redis.call('SET', idem, id) end
  redis.call('ZADD', queued, now, id)
  local rec = load()
  eval_job(rec)
  audit(rec, 'created', 'queued', p.agent, '')
  return {'created', id}
end

local rec = load()
if not rec then return {'missing'} end

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
  redis.call('PUBLISH', chan_prefix .. id, 'pending')
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
  redis.call('PUBLISH', chan_prefix .. id, 'pending')
  return {'voted', tostring(count), rec.min_approvals}
end

if op == 'reject' then
  local reason = p.reason
  if reason == '' then reason = 'rejected by ' .. p.actor end
  return finish(rec, 'rejected', p.actor, reason)
end

return redis.error_reply('unknown operation ' .. tostring(op))
