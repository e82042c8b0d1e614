//! Every Lua script this crate runs. The hot path's are built from two functions — `store`
//! (Celery's result store) and `take` (kombu's pop plus its `unacked` bookkeeping) — so each
//! rule is written once (celery-wire.md §1.2, §2). A script runs atomically: nothing else
//! happens in Redis between its steps, and a worker killed at any instant leaves either all of
//! a script's effects or none.

/// `store(key, meta, ttl)`: what Celery's Redis backend does (`GET`, keep a stored SUCCESS,
/// else `SETEX` — or `SET` with no expiry — and `PUBLISH` on the key's name). 1 = written,
/// 0 = a SUCCESS was already there (a redelivered duplicate finished first) and is kept.
///
/// `take(unacked, index, first, now, qjson, marker, token, forget, ttl)`: pop the first non-empty list among
/// `KEYS[first..]` (kombu's BRPOP order) and, when the message carries
/// `properties.delivery_tag`, record it in `unacked`/`unacked_index` exactly as kombu's
/// `QoS.append` does (`[<envelope>, "", "<queue>"]`, score = now) before returning. kombu's BRPOP
/// then MULTI leaves an instant where a killed consumer loses the message; this does not. A
/// message without a readable tag (garbage, some non-Python producers) comes back unrecorded
/// (tag `''`). `ARGV[qjson + i - first]` is the queue name of `KEYS[i]` as a JSON string; `now`
/// is Unix seconds, or `''` for the server's clock (a take queued behind a blocking wait).
/// The take is also noted in the worker's own `marker` hash (field `token` = the tag; the hash
/// expires `ttl` ms after the last take), and the fields in `forget` (space-separated tokens of
/// takes whose replies arrived) are deleted: so a take whose reply is lost can be found again
/// by its token ([`RECLAIM`]) as soon as the connection is back.
macro_rules! functions {
    () => {
        r#"
local function store(key, meta, ttl)
  local cur = redis.call('GET', key)
  if cur then
    local ok, m = pcall(cjson.decode, cur)
    if ok and type(m) == 'table' and m['status'] == 'SUCCESS' then return 0 end
  end
  ttl = tonumber(ttl)
  if ttl and ttl > 0 then redis.call('SETEX', key, ttl, meta) else redis.call('SET', key, meta) end
  redis.call('PUBLISH', key, meta)
  return 1
end
local function take(unacked, index, first, now, qjson, marker, token, forget, ttl)
  for t in string.gmatch(forget, '%S+') do redis.call('HDEL', marker, t) end
  if now == '' then
    local t = redis.call('TIME')
    now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  end
  for i = first, #KEYS do
    local m = redis.call('RPOP', KEYS[i])
    if m then
      local ok, env = pcall(cjson.decode, m)
      local tag = nil
      if ok and type(env) == 'table' and type(env['properties']) == 'table' then
        tag = env['properties']['delivery_tag']
      end
      if type(tag) == 'string' and #tag > 0 then
        redis.call('ZADD', index, now, tag)
        redis.call('HSET', unacked, tag, '[' .. m .. ', "", ' .. ARGV[qjson + i - first] .. ']')
        redis.call('HSET', marker, token, tag)
        redis.call('PEXPIRE', marker, ttl)
        return {KEYS[i], m, tag}
      end
      return {KEYS[i], m, ''}
    end
  end
  return false
end
"#
    };
}

/// Store a result. KEYS: the result key. ARGV: meta (JSON), ttl in seconds (0 = none).
/// Returns 1 (written) or 0 (a SUCCESS kept).
pub const STORE: &str = concat!(functions!(), "return store(KEYS[1], ARGV[1], ARGV[2])\n");

/// Store REVOKED from a remote `revoke`, only where Celery 5.7's `_revoke` stores it: when the
/// task has no result yet or its state is PENDING, RECEIVED, RETRY or REJECTED — never over a
/// result (SUCCESS, FAILURE, REVOKED) nor over STARTED or a custom state another worker set.
/// Celery reads the state and then writes; here both happen in one step. KEYS: the result key.
/// ARGV: meta (JSON), ttl in seconds (0 = none). Returns 1 (written) or 0 (left as it was).
pub const STORE_REVOKED_IF_WAITING: &str = concat!(
    functions!(),
    r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, m = pcall(cjson.decode, cur)
  local s = ok and type(m) == 'table' and m['status'] or nil
  if s ~= 'PENDING' and s ~= 'RECEIVED' and s ~= 'RETRY' and s ~= 'REJECTED' then return 0 end
end
return store(KEYS[1], ARGV[1], ARGV[2])
"
);

/// Take the next message. KEYS: `unacked`, `unacked_index`, the take marker, then the lists in
/// kombu's BRPOP order. ARGV: now (Unix seconds, or `''`: the server's), the take's token, the
/// tokens to forget, the marker's ttl (ms), then each list's queue name as a JSON string.
/// Returns `{list, message, tag}` (tag `''` when unrecorded) or nil when every list is empty.
pub const TAKE: &str =
    concat!(functions!(), "return take(KEYS[1], KEYS[2], 4, ARGV[1], 5, KEYS[3], ARGV[2], ARGV[3], ARGV[4])\n");

/// Find a take whose reply was lost. KEYS: the take marker, `unacked`, `unacked_index`. ARGV:
/// the take's token. Forgets the token; when that take recorded a message that is still in
/// `unacked`, renews its lease (score = the server's now) and returns `{tag, entry}`; nil when
/// the take took nothing, or its message was restored or settled since.
pub const RECLAIM: &str = r"
local tag = redis.call('HGET', KEYS[1], ARGV[1])
if not tag then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
local entry = redis.call('HGET', KEYS[2], tag)
if not entry then return false end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[3], tonumber(t[1]) + tonumber(t[2]) / 1000000, tag)
return {tag, entry}
";

/// Finish a message and take the next in one round trip: store its result (when `ARGV[3]`
/// names the result database: broker and backend are databases of one server), acknowledge it
/// (`ZREM unacked_index`, `HDEL unacked`), then take as [`TAKE`] from the lists that follow, if
/// any. If the store fails the script stops before the ack, so a message is never acknowledged
/// without its result. A script may SELECT another database for its own commands; the
/// caller's connection keeps its own.
/// KEYS: `unacked`, `unacked_index`, the result key (`''` when storing nothing), the take
/// marker, then the lists.
/// ARGV: delivery tag, broker db, result db (`''` = store nothing), meta, ttl, now, the take's
/// token, the tokens to forget, the marker's ttl (ms), then each list's queue name as a JSON
/// string.
/// Returns `{written}` or `{written, list, message, tag}`; written is 1, 0 (a SUCCESS kept) or
/// -1 (nothing stored).
pub const FINISH: &str = concat!(
    functions!(),
    r"
local written = -1
if ARGV[3] ~= '' then
  redis.call('SELECT', ARGV[3])
  written = store(KEYS[3], ARGV[4], ARGV[5])
  redis.call('SELECT', ARGV[2])
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
local t = take(KEYS[1], KEYS[2], 5, ARGV[6], 10, KEYS[4], ARGV[7], ARGV[8], ARGV[9])
if t then return {written, t[1], t[2], t[3]} end
return {written}
"
);

/// Move one `unacked` entry back to a queue if it is still the value we read — the same effect
/// as kombu's `WATCH unacked; HGET; MULTI; ZREM; HDEL; RPUSH; EXEC`, in one atomic step that is
/// safe on a multiplexed connection.
pub const MOVE_BACK: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
if ARGV[4] == 'front' then redis.call('RPUSH', KEYS[3], ARGV[3]) else redis.call('LPUSH', KEYS[3], ARGV[3]) end
return 1
";

/// redis-py's Lock release: delete the mutex only if we still own it.
pub const RELEASE_MUTEX: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Count `unacked` entries per routing key, one bounded HSCAN batch per call, inside Redis: the
/// ~1 kB payloads never cross the network and Redis is never blocked for long. An entry ends
/// with `, "<exchange>", "<routing_key>"]`, so the routing key is the last JSON string (a
/// routing key containing an escaped quote is not recognised).
pub const COUNT_UNACKED: &str = r#"
local res = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local vals = res[2]
local counts = {}
local byte = string.byte
for i = 2, #vals, 2 do
  -- Read backwards from the closing bracket: the work per entry is the routing key's length,
  -- not the payload's.
  local v = vals[i]
  local e = #v
  while e > 0 and byte(v, e) ~= 93 do e = e - 1 end
  e = e - 1
  while e > 0 and byte(v, e) == 32 do e = e - 1 end
  if e > 0 and byte(v, e) == 34 then
    local s = e - 1
    while s > 0 and byte(v, s) ~= 34 do s = s - 1 end
    if s > 0 then
      local rk = string.sub(v, s + 1, e - 1)
      counts[rk] = (counts[rk] or 0) + 1
    end
  end
end
local out = {res[1]}
for k, v in pairs(counts) do
  out[#out + 1] = k
  out[#out + 1] = v
end
return out
"#;

/// Count one chord header task's result, and claim the sending of the body when it is the
/// last — one atomic step, the semantics of Celery 5.7's Redis backend (`on_chord_part_return`;
/// celery-wire.md §2.4), so that of every worker in a fleet, Python's or ours, exactly one
/// sends the body.
///
/// KEYS: `.j`, `.t`, `.s`, `.d`, the group's result key, `.c` (see `wire::keys::ChordKeys`).
/// ARGV: task id, entry (`[1, id, state, result]`), `1` for the sorted-set join (`0`: the list),
/// score (`group_index` or `+inf`), expiry of the join keys (s; 0 = none), expiry of the group
/// result key (s; 0 = leave it), claim expiry (s), claim token.
///
/// - `.c` = `done`: the body was sent and the chord cleaned up; a late duplicate changes
///   nothing (`{-1}`).
/// - The entry is added unless `.d` already holds `id:score` (a redelivered header task counts
///   once, whatever it returned the second time): ZADD by score, or RPUSH. A join key that
///   already exists keeps its type (a fleet whose other workers use the other form still
///   meets in one key, where Celery would fail with WRONGTYPE).
/// - Every join key gets the expiry again (the group key its own), as Celery does.
/// - Complete when the count equals `.s` + `.t`; then `.c` is taken with SET NX EX: only the
///   first worker to see the chord complete gets it.
///
/// Returns `{count, extra, size, claimed}` (`size` -1 when `.s` is not set: nothing to
/// decide); when claimed, followed by whether the group result key exists (a header of
/// groups, saved by the producer) and every entry in join order — the join in the same step.
pub const CHORD_PART: &str = r"
local join, extra_key, size_key, seen, group, claim = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local task_id, entry, score = ARGV[1], ARGV[2], ARGV[4]
local expires, group_expires = tonumber(ARGV[5]), tonumber(ARGV[6])
if redis.call('GET', claim) == 'done' then return {-1} end
local sorted = ARGV[3] == '1'
local kind = redis.call('TYPE', join)['ok']
if kind == 'zset' then sorted = true elseif kind == 'list' then sorted = false end
local member = task_id .. ':' .. score
if redis.call('SADD', seen, member) == 1 then
  if sorted then redis.call('ZADD', join, score, entry) else redis.call('RPUSH', join, entry) end
end
local count
if sorted then count = redis.call('ZCARD', join) else count = redis.call('LLEN', join) end
if expires and expires > 0 then
  redis.call('EXPIRE', join, expires)
  redis.call('EXPIRE', extra_key, expires)
  redis.call('EXPIRE', size_key, expires)
  redis.call('EXPIRE', seen, expires)
  if group_expires and group_expires > 0 then redis.call('EXPIRE', group, group_expires) end
end
local extra = tonumber(redis.call('GET', extra_key) or '0') or 0
local size = tonumber(redis.call('GET', size_key) or '-1') or -1
if size < 0 or count ~= size + extra then return {count, extra, size, 0} end
if not redis.call('SET', claim, ARGV[8], 'NX', 'EX', ARGV[7]) then return {count, extra, size, 0} end
local out = {count, extra, size, 1, redis.call('EXISTS', group)}
local entries
if sorted then entries = redis.call('ZRANGE', join, 0, -1) else entries = redis.call('LRANGE', join, 0, -1) end
for i = 1, #entries do out[#out + 1] = entries[i] end
return out
";

/// Keep the claim on a chord's body while it is sent: extend it to `ARGV[2]` seconds while it
/// is still ours (`ARGV[1]`), or take it again if it lapsed and the chord is still there (`.s`
/// exists) — Celery's claim extension before the publish. KEYS: `.c`, `.s`. Returns 1 when the
/// claim is ours.
pub const CHORD_EXTEND_CLAIM: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if not cur and redis.call('EXISTS', KEYS[2]) == 1 then
  if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end
end
return 0
";

/// After the body was sent: if the claim is still ours (`ARGV[1]`), delete the join keys and
/// mark the chord `done` for `ARGV[2]` seconds, so a late duplicate of a header task neither
/// recreates the chord nor sends the body again. KEYS: `.c`, `.j`, `.t`, `.s`, `.d`. Returns 1
/// when cleaned up, 0 when the claim was lost (the keys are left to expire).
pub const CHORD_CLEANUP: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local ttl = tonumber(ARGV[2])
if ttl and ttl > 0 then redis.call('SET', KEYS[1], 'done', 'EX', ttl) end
return 1
";
