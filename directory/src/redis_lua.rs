//! The Lua scripts of [`crate::redis_store`]: every multi-key update runs as one script, so it
//! is atomic in Redis (no other command runs in between), and several directory replicas on one
//! Redis never see half an update.
//!
//! Every script takes the key prefix as `ARGV[1]` and builds its key names from it (see the key
//! layout in [`crate::redis_store`]); keys are computed inside the scripts, so they need a
//! standalone Redis (or a single primary), not Redis Cluster. Epochs travel as decimal text and
//! are compared as such ([`COMMON`]'s `ecmp`): Lua numbers are doubles and would round epochs
//! above 2^53. Timestamps (milliseconds) and TTLs are numbers.

/// Helpers shared by every script: key names, epoch comparison, the presence entry codec and
/// the per-(node, epoch) index of presence entries.
const COMMON: &str = r#"
local P = ARGV[1]
local function k_nodes() return P .. ':nodes' end
local function k_node(id) return P .. ':node:' .. id end
local function k_user(u) return P .. ':user:' .. u end
local function k_pnodes() return P .. ':pnodes' end
local function k_pepochs(n) return P .. ':pepochs:' .. n end
local function k_pidx(n, e) return P .. ':pidx:' .. n .. ':' .. e end
local function k_entries() return P .. ':entries' end
local function num(x) return string.format('%.0f', x) end
-- Compare two epochs written as decimal text without leading zeros.
local function ecmp(a, b)
  if #a ~= #b then
    if #a < #b then return -1 else return 1 end
  end
  if a == b then return 0 end
  if a < b then return -1 else return 1 end
end
-- Index member of a (user, device) pair: "<len(user)>:<user><device>".
local function member(u, d) return #u .. ':' .. u .. d end
local function split_member(m)
  local colon = string.find(m, ':', 1, true)
  if not colon then return nil, nil end
  local n = tonumber(string.sub(m, 1, colon - 1))
  if not n then return nil, nil end
  return string.sub(m, colon + 1, colon + n), string.sub(m, colon + n + 1)
end
-- Presence entry value: "<epoch>|<status>|<last_seen_ms>|<node_id>".
local function parse_entry(v)
  return string.match(v, '^(%d+)|(%a+)|(%d+)|(.*)$')
end
local function tidy_index(n, e)
  if redis.call('EXISTS', k_pidx(n, e)) == 0 then
    redis.call('SREM', k_pepochs(n), e)
    if redis.call('EXISTS', k_pepochs(n)) == 0 then
      redis.call('SREM', k_pnodes(), n)
    end
  end
end
local function unindex(n, e, m)
  redis.call('ZREM', k_pidx(n, e), m)
  tidy_index(n, e)
end
-- Delete the entries in the index of (n, e) last seen at or before max (all when max is nil);
-- returns how many entries were deleted.
local function drop_index(n, e, max)
  local idx = k_pidx(n, e)
  local members
  if max then
    members = redis.call('ZRANGEBYSCORE', idx, '-inf', num(max))
  else
    members = redis.call('ZRANGE', idx, 0, -1)
  end
  local count = 0
  for _, m in ipairs(members) do
    local u, d = split_member(m)
    if u then
      local uk = k_user(u)
      local v = redis.call('HGET', uk, d)
      if v then
        local ve, _, _, vn = parse_entry(v)
        if ve == e and vn == n then
          redis.call('HDEL', uk, d)
          count = count + 1
        end
      end
    end
    redis.call('ZREM', idx, m)
  end
  tidy_index(n, e)
  if count > 0 then redis.call('DECRBY', k_entries(), count) end
  return count
end
-- Delete every entry of node n at epochs below `below` (and at `below` when inclusive).
local function purge(n, below, inclusive)
  local count = 0
  for _, e in ipairs(redis.call('SMEMBERS', k_pepochs(n))) do
    local c = ecmp(e, below)
    if c < 0 or (inclusive and c == 0) then
      count = count + drop_index(n, e, nil)
    end
  end
  return count
end
local function write_entry(n, e, u, d, s, now)
  local uk = k_user(u)
  local m = member(u, d)
  local old = redis.call('HGET', uk, d)
  if old then
    local oe, _, _, on = parse_entry(old)
    if oe and (oe ~= e or on ~= n) then unindex(on, oe, m) end
  else
    redis.call('INCR', k_entries())
  end
  redis.call('HSET', uk, d, e .. '|' .. s .. '|' .. now .. '|' .. n)
  redis.call('ZADD', k_pidx(n, e), now, m)
  redis.call('SADD', k_pepochs(n), e)
  redis.call('SADD', k_pnodes(), n)
end
local function node_epoch(n) return redis.call('HGET', k_node(n), 'epoch') end
"#;

/// `ARGV`: prefix, node_id, internal_url, epoch, load, now. Refuses an older epoch than the
/// current one; otherwise writes the record and purges presence of older epochs.
/// Returns `{"stale", current}` or `{"ok", previous_epoch or "", purged}`.
const REGISTER_NODE: &str = r#"
local n, url, e, load, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local cur = node_epoch(n)
if cur and ecmp(e, cur) < 0 then return {'stale', cur} end
redis.call('HSET', k_node(n), 'url', url, 'epoch', e, 'load', load, 'hb', now)
redis.call('SADD', k_nodes(), n)
local purged = purge(n, e, false)
return {'ok', cur or '', tostring(purged)}
"#;

/// `ARGV`: prefix, node_id, epoch, load, now, retention_ms. Returns `{"ok"}`,
/// `{"stale", current}` or `{"unknown"}`.
const NODE_HEARTBEAT: &str = r#"
local n, e, load, now, retain = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local h = redis.call('HMGET', k_node(n), 'epoch', 'hb')
local cur, hb = h[1], h[2]
if cur then
  local c = ecmp(e, cur)
  if c == 0 and now - tonumber(hb) < retain then
    redis.call('HSET', k_node(n), 'load', load, 'hb', ARGV[5])
    return {'ok'}
  elseif c < 0 then
    return {'stale', cur}
  end
end
return {'unknown'}
"#;

/// `ARGV`: prefix, node_id, epoch. Returns `{"removed", purged}`, `{"absent", purged}` or
/// `{"stale", current}`.
const DEREGISTER_NODE: &str = r#"
local n, e = ARGV[2], ARGV[3]
local cur = node_epoch(n)
if cur then
  local c = ecmp(e, cur)
  if c == 0 then
    redis.call('DEL', k_node(n))
    redis.call('SREM', k_nodes(), n)
    return {'removed', tostring(purge(n, e, true))}
  elseif c < 0 then
    return {'stale', cur}
  end
end
return {'absent', tostring(purge(n, e, true))}
"#;

/// `ARGV`: prefix, node_id, epoch, now, then (user, device, status) triples. Returns
/// `{"applied", written}`, `{"stale", current}` or `{"unknown"}`.
const UPDATE_PRESENCE: &str = r#"
local n, e, now = ARGV[2], ARGV[3], ARGV[4]
local cur = node_epoch(n)
if not cur then return {'unknown'} end
local c = ecmp(e, cur)
if c < 0 then return {'stale', cur} end
if c > 0 then return {'unknown'} end
local written = 0
for i = 5, #ARGV - 2, 3 do
  write_entry(n, e, ARGV[i], ARGV[i + 1], ARGV[i + 2], now)
  written = written + 1
end
return {'applied', tostring(written)}
"#;

/// `ARGV`: prefix, user, device, node_id, epoch. Returns `{"removed"}`, `{"notfound"}` or
/// `{"stale", current}`.
const REMOVE_PRESENCE: &str = r#"
local u, d, n, e = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local cur = node_epoch(n)
if cur and ecmp(e, cur) < 0 then return {'stale', cur} end
local uk = k_user(u)
local v = redis.call('HGET', uk, d)
if v then
  local ve, _, _, vn = parse_entry(v)
  if ve == e and vn == n then
    redis.call('HDEL', uk, d)
    redis.call('DECR', k_entries())
    unindex(n, e, member(u, d))
    return {'removed'}
  end
end
return {'notfound'}
"#;

/// `ARGV`: prefix, then users. Returns `{nodes, user_1, ..., user_n}`: `nodes` flat
/// `(id, url, epoch, hb)` of every node the entries name, each `user_i` the flat
/// `(device, value)` pairs of that user's hash.
const LOOKUP: &str = r#"
local out = {}
local seen = {}
local nodes = {}
for i = 2, #ARGV do
  local flat = redis.call('HGETALL', k_user(ARGV[i]))
  out[i] = flat
  for j = 2, #flat, 2 do
    local _, _, _, n = parse_entry(flat[j])
    if n and not seen[n] then
      seen[n] = true
      local h = redis.call('HMGET', k_node(n), 'url', 'epoch', 'hb')
      if h[1] and h[2] and h[3] then
        table.insert(nodes, n)
        table.insert(nodes, h[1])
        table.insert(nodes, h[2])
        table.insert(nodes, h[3])
      end
    end
  end
end
out[1] = nodes
return out
"#;

/// `ARGV`: prefix. Returns `{nodes, relays, entries}`: `nodes` flat
/// `(id, url, epoch, load, hb)`, `relays` the stored relay records, `entries` the entry count.
const SNAPSHOT: &str = r#"
local nodes = {}
for _, n in ipairs(redis.call('SMEMBERS', k_nodes())) do
  local h = redis.call('HMGET', k_node(n), 'url', 'epoch', 'load', 'hb')
  if h[1] and h[2] and h[3] and h[4] then
    table.insert(nodes, n)
    for i = 1, 4 do table.insert(nodes, h[i]) end
  end
end
local relays = redis.call('HGETALL', P .. ':relays')
local entries = redis.call('GET', k_entries()) or '0'
local handed = redis.call('HGETALL', P .. ':handed')
return {nodes, relays, {entries}, handed}
"#;

/// `ARGV`: prefix. Returns `{relays, handed}`: the stored relay records and the handed-out
/// counters, read together (flat `id, value` lists).
const READ_RELAYS: &str = r#"
return {redis.call('HGETALL', P .. ':relays'), redis.call('HGETALL', P .. ':handed')}
"#;

/// `ARGV`: prefix, then relay ids: each chosen relay's handed-out counter goes up by one
/// (`HINCRBY`, so choices through any number of replicas never conflict); a relay removed
/// meanwhile gets no counter. Returns how many were counted.
const HAND_OUT: &str = r#"
local n = 0
for i = 2, #ARGV do
  if redis.call('HEXISTS', P .. ':relays', ARGV[i]) == 1 then
    redis.call('HINCRBY', P .. ':handed', ARGV[i], 1)
    n = n + 1
  end
end
return n
"#;

/// `ARGV`: prefix, relay id, record: (re)registers the relay with its handed-out counter at 0.
const REGISTER_RELAY: &str = r#"
redis.call('HSET', P .. ':relays', ARGV[2], ARGV[3])
redis.call('HDEL', P .. ':handed', ARGV[2])
return 1
"#;

/// `ARGV`: prefix, relay id. Removes the record and its counter; returns 1 when it existed.
const DEREGISTER_RELAY: &str = r#"
redis.call('HDEL', P .. ':handed', ARGV[2])
return redis.call('HDEL', P .. ':relays', ARGV[2])
"#;

/// `ARGV`: prefix, now, node_ttl_ms, presence_ttl_ms. Removes node records past both TTLs,
/// then every presence entry that is no longer live. Returns `{nodes, presence}` removed.
const SWEEP: &str = r#"
local now, nttl, pttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local retain = math.max(nttl, pttl)
local nodes = 0
for _, n in ipairs(redis.call('SMEMBERS', k_nodes())) do
  local hb = redis.call('HGET', k_node(n), 'hb')
  if not hb then
    redis.call('SREM', k_nodes(), n)
  elseif now - tonumber(hb) >= retain then
    redis.call('DEL', k_node(n))
    redis.call('SREM', k_nodes(), n)
    nodes = nodes + 1
  end
end
local presence = 0
for _, n in ipairs(redis.call('SMEMBERS', k_pnodes())) do
  local h = redis.call('HMGET', k_node(n), 'epoch', 'hb')
  local cur, hb = h[1], h[2]
  local epochs = redis.call('SMEMBERS', k_pepochs(n))
  if #epochs == 0 then redis.call('SREM', k_pnodes(), n) end
  for _, e in ipairs(epochs) do
    if cur and ecmp(e, cur) < 0 then
      presence = presence + drop_index(n, e, nil)
    else
      -- The node's heartbeat keeps every entry of its current epoch alive; otherwise an
      -- entry lives by its own last write.
      local kept = cur and e == cur and hb and now - tonumber(hb) < pttl
      if not kept and now >= pttl then
        presence = presence + drop_index(n, e, now - pttl)
      end
    end
  end
end
return {tostring(nodes), tostring(presence)}
"#;

/// `ARGV`: prefix, then (relay_id, expected, new) triples: applied only when every relay's
/// stored record still equals `expected` (`""` = absent); `new` = `""` deletes. A write (a
/// heartbeat's new figures, or a removal) resets the relay's handed-out counter. Returns 1 when
/// applied, 0 when another writer came first (the caller reads again and retries).
const RELAYS_CAS: &str = r#"
local k = P .. ':relays'
for i = 2, #ARGV - 2, 3 do
  local cur = redis.call('HGET', k, ARGV[i]) or ''
  if cur ~= ARGV[i + 1] then return 0 end
end
for i = 2, #ARGV - 2, 3 do
  if ARGV[i + 2] == '' then
    redis.call('HDEL', k, ARGV[i])
  else
    redis.call('HSET', k, ARGV[i], ARGV[i + 2])
  end
  redis.call('HDEL', P .. ':handed', ARGV[i])
end
return 1
"#;

/// The compiled scripts (each is [`COMMON`] followed by its body).
pub(crate) struct Scripts {
    pub register_node: redis::Script,
    pub node_heartbeat: redis::Script,
    pub deregister_node: redis::Script,
    pub update_presence: redis::Script,
    pub remove_presence: redis::Script,
    pub lookup: redis::Script,
    pub snapshot: redis::Script,
    pub sweep: redis::Script,
    pub relays_cas: redis::Script,
    pub read_relays: redis::Script,
    pub hand_out: redis::Script,
    pub register_relay: redis::Script,
    pub deregister_relay: redis::Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        let s = |body: &str| redis::Script::new(&format!("{COMMON}\n{body}"));
        Self {
            register_node: s(REGISTER_NODE),
            node_heartbeat: s(NODE_HEARTBEAT),
            deregister_node: s(DEREGISTER_NODE),
            update_presence: s(UPDATE_PRESENCE),
            remove_presence: s(REMOVE_PRESENCE),
            lookup: s(LOOKUP),
            snapshot: s(SNAPSHOT),
            sweep: s(SWEEP),
            relays_cas: s(RELAYS_CAS),
            read_relays: s(READ_RELAYS),
            hand_out: s(HAND_OUT),
            register_relay: s(REGISTER_RELAY),
            deregister_relay: s(DEREGISTER_RELAY),
        }
    }
}
