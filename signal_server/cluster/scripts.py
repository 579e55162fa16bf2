"""The Lua scripts that are the only writers of the cluster registry in Redis.

Each script runs atomically in Redis, so admission, takeover, holding,
keeping and reaping never race between nodes: Redis is the arbiter, not a
home-made protocol. Every membership change bumps the room's version and
publishes an event to each *other* node with members in the room, inside the
same script, so nodes see changes in the order Redis applied them. Every
deadline comes from Redis ``TIME``: node clocks are never compared.

Key layout (docs/scaling.md): ``sig:{R}:m`` member hash, ``sig:{R}:v`` room
version, ``sig:{R}:k:U`` kept frames of a held slot, ``sig:held`` deadlines,
``sig:nodes`` registered nodes, ``sig:node:N`` liveness key, ``sig:n:N:r``
rooms where node N has members, ``sig:ch:N`` node N's channel.

Member record (JSON): ``u`` username, ``n`` node, ``s`` join order, ``c``
epoch (bumped by every takeover or resume), ``h`` held deadline in ms (0 when
live), ``o`` 1 when kept frames were lost (resume says recovered false),
``b`` kept bytes, ``r`` the leave reason when the hold expires, ``j`` when the user joined (ms).

Room service (admin API): ``sig:{R}:c`` when the room was created (ms),
``sig:{R}:ban:U`` a user banned from the room, ``sig:{R}:closed`` a room
closed with a ban; both bans expire by themselves (PX). ``sig:{R}:out:U``:
U was kicked or was in the room when it was closed; for the reconnect grace
its joins are answered ``KICKED`` / ``ROOM_CLOSED`` (its client's automatic
reconnect must not undo the kick or reopen the room).

Versions never go backwards for a room name: a room that empties leaves its
last version in ``sig:vmax`` (the highest of every emptied room), and a room
made again with that name counts on from there. A node that still mirrors
the old room (a join in flight, an event on its way) thus tells old news from
new; epochs start at the record's join order, so they never repeat either.

Webhooks (webhooks.py, events.py): ``sig:wh:q`` the events the scripts
decide, ``sig:wh:f:N:B`` those node N (process B) took and has not finished,
``sig:wh:orphans`` in-flight lists to give back, ``sig:wh:fin`` rooms whose
room_finished waits for the re-registrations, ``sig:wh:on`` the switch.
"""

from __future__ import annotations

__all__ = [
    "PRELUDE", "JOIN", "LEAVE", "HOLD", "KEEP", "REAP", "NODE_UP", "NODE_DOWN", "RELEASE_NODES", "RESTORE",
    "KICK", "CLOSE", "SEND", "HANDED", "MEMBERS",
]

# Shared helpers, prepended to every script.
PRELUDE = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function room_keys(R)
  return 'sig:{' .. R .. '}:m', 'sig:{' .. R .. '}:v'
end
local function kept_key(R, U)
  return 'sig:{' .. R .. '}:k:' .. U
end
local function nodes_of(mkey)
  local seen = {}
  local vals = redis.call('HVALS', mkey)
  for i = 1, #vals do seen[cjson.decode(vals[i]).n] = true end
  return seen
end
local function emit(mkey, except, also, kind, header)
  local targets = nodes_of(mkey)
  if also ~= '' then targets[also] = true end
  local msg = kind .. cjson.encode(header) .. '\n'
  for node, _ in pairs(targets) do
    if node ~= except then redis.call('PUBLISH', 'sig:ch:' .. node, msg) end
  end
end
local function members(mkey)
  local out = {}
  local all = redis.call('HGETALL', mkey)
  for i = 1, #all, 2 do
    local rec = cjson.decode(all[i + 1])
    out[#out + 1] = {all[i], rec.u, rec.n, rec.s, rec.c}
  end
  return cjson.encode(out)
end
-- A webhook event, decided here atomically with the change it describes, for
-- one node to take and deliver (webhooks.py); only while some node delivers
-- webhooks (sig:wh:on), and at most 10,000 waiting (then counted, dropped).
-- Its id is made here, so a delivery repeated after a node died carries the
-- same one: Redis' clock in microseconds (also the event's time, ``us``, a
-- string: cjson writes numbers with 14 digits), then a counter. ``t`` (ms) is
-- for nodes of an earlier version.
local function webhook(kind, R, U, name, reason)
  if redis.call('EXISTS', 'sig:wh:on') == 0 then return end
  if redis.call('LLEN', 'sig:wh:q') >= 10000 then
    redis.call('INCR', 'sig:wh:dropped')
    return
  end
  local t = redis.call('TIME')
  local us = t[1] .. string.format('%06d', tonumber(t[2]))
  local id = 'evt_' .. us .. '_' .. redis.call('INCR', 'sig:wh:n')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('RPUSH', 'sig:wh:q', cjson.encode(
    {id = id, e = kind, r = R, u = U, n = name, why = reason, t = ms, us = us}))
end
-- The events a node took (sig:wh:f:<node>:<boot>) and did not finish, when that
-- process is gone: back to the head of the queue, in their order. Bounded per
-- call; what is left stays in sig:wh:orphans for the next tick of any node.
local function give_back_webhooks(limit)
  for _, owner in ipairs(redis.call('SMEMBERS', 'sig:wh:orphans')) do
    local taken = 'sig:wh:f:' .. owner
    while limit > 0 and redis.call('LMOVE', taken, 'sig:wh:q', 'RIGHT', 'LEFT') do limit = limit - 1 end
    if limit == 0 then return end
    redis.call('SREM', 'sig:wh:orphans', owner)
  end
end
local function finished_if_empty(mkey, R)
  if redis.call('HLEN', mkey) == 0 then webhook('room_finished', R) end
end
-- KEEP's work (see KEEP), shared with SEND.
local function keep(R, U, node, frame, maxn, maxb)
  local mkey = room_keys(R)
  local raw = redis.call('HGET', mkey, U)
  if not raw then return 0 end
  local rec = cjson.decode(raw)
  if rec.h == 0 then
    if rec.n ~= node then
      local header = cjson.encode({r = R, s = '', t = {U}, f = 1, o = node})
      if redis.call('PUBLISH', 'sig:ch:' .. rec.n, 'm' .. header .. '\n' .. frame) > 0 then return 2 end
    end
    rec.o = 1
    redis.call('HSET', mkey, U, cjson.encode(rec))
    return 0
  end
  if rec.o == 1 then return 0 end
  local kkey = kept_key(R, U)
  if redis.call('LLEN', kkey) >= maxn or rec.b + #frame > maxb then
    rec.o = 1
    rec.b = 0
    redis.call('DEL', kkey)
    redis.call('HSET', mkey, U, cjson.encode(rec))
    return 3
  end
  redis.call('RPUSH', kkey, frame)
  redis.call('PEXPIREAT', kkey, rec.h + 5000)
  rec.b = rec.b + #frame
  redis.call('HSET', mkey, U, cjson.encode(rec))
  return 1
end
local function bump(vkey)
  if redis.call('EXISTS', vkey) == 0 then
    local floor = redis.call('GET', 'sig:vmax')
    if floor then redis.call('SET', vkey, floor) end
  end
  return redis.call('INCR', vkey)
end
local function retire(vkey, R)
  local last = tonumber(redis.call('GET', vkey) or '0')
  if last > tonumber(redis.call('GET', 'sig:vmax') or '0') then redis.call('SET', 'sig:vmax', last) end
  redis.call('DEL', vkey, 'sig:{' .. R .. '}:c')
end
local function forget_node_room(mkey, vkey, node, R)
  if not nodes_of(mkey)[node] then redis.call('SREM', 'sig:n:' .. node .. ':r', R) end
  if redis.call('HLEN', mkey) == 0 then retire(vkey, R) end
end
"""

# ARGV: room, user, username, node, max_participants
# -> {0, count} when full; {-1, ms left} when banned (room closed with a ban, or the user kicked with one);
# {-2, 'KICKED' or 'ROOM_CLOSED'} within the grace after the user was kicked or its room closed;
# else {1, version, resumed, held, overflowed, epoch, members-json, old node, {nodes the takeover
# event reached}, deaf, kept frames...}. A resume of a slot held on another node: that node and
# every node the event reached may still have frames for the user on their way through the old
# node, so the resuming node waits for their hand-off barriers (hub.py) before it says recovered.
# deaf: the old node's key is alive but it did not hear the event: it was killed (its frames were
# kept), or it is cut off from Redis and may have dropped some; the resuming node finds out which.
JOIN = r"""
local R, U, name, node, maxp = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local mkey, vkey = room_keys(R)
local banned = math.max(
  redis.call('PTTL', 'sig:{' .. R .. '}:closed'), redis.call('PTTL', 'sig:{' .. R .. '}:ban:' .. U))
if banned > 0 then return {-1, banned} end
local removed = redis.call('GET', 'sig:{' .. R .. '}:out:' .. U)
if removed then return {-2, removed} end
local kkey = kept_key(R, U)
local raw = redis.call('HGET', mkey, U)
local rec
local old = ''
local resumed, held, overflowed = 0, 0, 0
local kept = {}
if raw then
  rec = cjson.decode(raw)
  resumed = 1
  old = rec.n
  if rec.h > 0 then
    held = 1
    overflowed = rec.o
    kept = redis.call('LRANGE', kkey, 0, -1)
    redis.call('ZREM', 'sig:held', R .. '\0' .. U)
  end
  redis.call('DEL', kkey)
  rec.n = node
  rec.h = 0
  rec.o = 0
  rec.b = 0
  rec.c = rec.c + 1
else
  local count = redis.call('HLEN', mkey)
  if count >= maxp then return {0, count} end
  if count == 0 then
    redis.call('SET', 'sig:{' .. R .. '}:c', now_ms())
    if redis.call('ZREM', 'sig:wh:fin', R) == 1 then webhook('room_finished', R) end
    webhook('room_started', R)
  end
  local seq = bump(vkey)
  rec = {u = name, n = node, s = seq, c = seq, h = 0, o = 0, b = 0, r = 'timeout', j = now_ms()}
end
redis.call('HSET', mkey, U, cjson.encode(rec))
redis.call('SADD', 'sig:n:' .. node .. ':r', R)
if old ~= '' and old ~= node then forget_node_room(mkey, vkey, old, R) end
local ver = bump(vkey)
local reached, deaf = {}, 0
if resumed == 1 then
  local targets = nodes_of(mkey)
  targets[old] = true
  local msg = 't' .. cjson.encode({r = R, u = U, n = node, v = ver, c = rec.c, o = old, h = held}) .. '\n'
  for target, _ in pairs(targets) do
    if target ~= node then
      if redis.call('PUBLISH', 'sig:ch:' .. target, msg) > 0 then
        reached[#reached + 1] = target
      elseif target == old and redis.call('EXISTS', 'sig:node:' .. old) == 1 then
        deaf = 1
      end
    end
  end
  webhook('participant_resumed', R, U, rec.u)
else
  emit(mkey, node, '', 'j', {r = R, u = U, name = name, n = node, v = ver, s = rec.s})
  webhook('participant_joined', R, U, name)
end
local reply = {1, ver, resumed, held, overflowed, rec.c, members(mkey), old, reached, deaf}
for i = 1, #kept do reply[#reply + 1] = kept[i] end
return reply
"""

# ARGV: room, user, node, epoch, reason -> 1 when this node's slot was removed
LEAVE = r"""
local R, U, node, epoch, reason = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local mkey, vkey = room_keys(R)
local raw = redis.call('HGET', mkey, U)
if not raw then return 0 end
local rec = cjson.decode(raw)
if rec.n ~= node or rec.c ~= epoch then return 0 end
redis.call('HDEL', mkey, U)
redis.call('DEL', kept_key(R, U))
redis.call('ZREM', 'sig:held', R .. '\0' .. U)
local ver = bump(vkey)
emit(mkey, node, '', 'l', {r = R, u = U, name = rec.u, why = reason, v = ver})
webhook('participant_left', R, U, rec.u, reason)
finished_if_empty(mkey, R)
forget_node_room(mkey, vkey, node, R)
return 1
"""

# ARGV: room, user, node, epoch, grace_ms, incomplete (1: frames were lost on the way) -> 1 when held
HOLD = r"""
local R, U, node, epoch, grace = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local mkey = room_keys(R)
local raw = redis.call('HGET', mkey, U)
if not raw then return 0 end
local rec = cjson.decode(raw)
if rec.n ~= node or rec.c ~= epoch or rec.h > 0 then return 0 end
rec.h = now_ms() + grace
rec.r = 'timeout'
if ARGV[6] == '1' then rec.o = 1 end
redis.call('HSET', mkey, U, cjson.encode(rec))
redis.call('ZADD', 'sig:held', rec.h, R .. '\0' .. U)
return 1
"""

# Keep a frame for a held slot (bounded; past the bound keep nothing), or
# forward it to the node the slot moved to (the forward's ``o`` names the node
# it was meant for: after a hand-off that timed out the new node drops what its
# old node forwards late), or mark it lost when the node the sender believed in is dead.
# ARGV: room, user, node the frame was meant for, frame, max count, max bytes
# -> 0 dropped, 1 kept, 2 forwarded, 3 overflowed
KEEP = r"""
return keep(ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]))
"""

# Remove every held slot whose deadline has passed; each removal is one
# atomic step, so its user_left is published exactly once cluster-wide.
# -> number reaped
REAP = r"""
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', 'sig:held', '-inf', now, 'LIMIT', 0, 200)
local reaped = 0
for _, item in ipairs(due) do
  redis.call('ZREM', 'sig:held', item)
  local sep = string.find(item, '\0', 1, true)
  local R, U = string.sub(item, 1, sep - 1), string.sub(item, sep + 1)
  local mkey, vkey = room_keys(R)
  local raw = redis.call('HGET', mkey, U)
  if raw then
    local rec = cjson.decode(raw)
    if rec.h > 0 and rec.h <= now then
      redis.call('HDEL', mkey, U)
      redis.call('DEL', kept_key(R, U))
      local ver = bump(vkey)
      emit(mkey, '', rec.n, 'l', {r = R, u = U, name = rec.u, why = rec.r, v = ver})
      webhook('participant_left', R, U, rec.u, rec.r)
      finished_if_empty(mkey, R)
      forget_node_room(mkey, vkey, rec.n, R)
      reaped = reaped + 1
    end
  end
end
-- Rooms a re-registration left empty, once the other nodes had time to re-register theirs.
for _, R in ipairs(redis.call('ZRANGEBYSCORE', 'sig:wh:fin', '-inf', now, 'LIMIT', 0, 200)) do
  redis.call('ZREM', 'sig:wh:fin', R)
  local mkey = room_keys(R)
  if redis.call('HLEN', mkey) == 0 then webhook('room_finished', R) end
end
return reaped
"""

# Announce this node; a node that delivers webhooks also (re)sets the switch
# that makes the scripts push events (after Redis restarted empty, before this
# node's re-registration runs). The webhook events a previous process with this
# id took and never finished are given back (it died and nobody noticed yet);
# this process's own, given back because it was wrongly found dead, stay its own.
# ARGV: node, boot id, ttl_ms, webhook switch ms (0: this node delivers none)
# -> 0 the id is held by another live process; 1 refreshed; 2 (re)registered
# (first start, or Redis lost us: the caller re-registers its slots)
NODE_UP = r"""
local node, boot, ttl, switch = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local key = 'sig:node:' .. node
local current = redis.call('GET', key)
if current and current ~= boot then return 0 end
redis.call('SET', key, boot, 'PX', ttl)
if switch > 0 then redis.call('SET', 'sig:wh:on', '1', 'PX', switch) end
local known = redis.call('HGET', 'sig:nodes', node)
redis.call('HSET', 'sig:nodes', node, boot)
if known == boot then return 1 end
if known then redis.call('SADD', 'sig:wh:orphans', node .. ':' .. known) end
redis.call('SREM', 'sig:wh:orphans', node .. ':' .. boot)
return 2
"""

# ARGV: node, boot id (its unfinished webhook events are given back)
NODE_DOWN = r"""
if redis.call('GET', 'sig:node:' .. ARGV[1]) == ARGV[2] then redis.call('DEL', 'sig:node:' .. ARGV[1]) end
if redis.call('HGET', 'sig:nodes', ARGV[1]) == ARGV[2] then redis.call('HDEL', 'sig:nodes', ARGV[1]) end
if redis.call('EXISTS', 'sig:wh:f:' .. ARGV[1] .. ':' .. ARGV[2]) == 1 then
  redis.call('SADD', 'sig:wh:orphans', ARGV[1] .. ':' .. ARGV[2])
  give_back_webhooks(1000)
end
return redis.call('HLEN', 'sig:nodes')
"""

# Find registered nodes whose liveness key expired and hold their live slots
# for the grace with reason node_lost (and marked incomplete: nobody can say
# what the dead node's clients had read). Removing the node from sig:nodes in the
# same step makes the release happen exactly once. The node's room set is
# deleted once processed (its held records are reaped or resumed later, each
# without it); its size is bounded by the rooms where that node had members.
# The webhook events the node took and did not finish go back to the queue
# (at most 1,000 per call, the rest on the next ticks).
# ARGV: grace_ms -> {live node count, released node ids...}
RELEASE_NODES = r"""
local grace = tonumber(ARGV[1])
local released = {}
local now = now_ms()
local nodes = redis.call('HGETALL', 'sig:nodes')
for n = 1, #nodes, 2 do
  local node = nodes[n]
  if redis.call('EXISTS', 'sig:node:' .. node) == 0 then
    redis.call('HDEL', 'sig:nodes', node)
    redis.call('SADD', 'sig:wh:orphans', node .. ':' .. nodes[n + 1])
    released[#released + 1] = node
    for _, R in ipairs(redis.call('SMEMBERS', 'sig:n:' .. node .. ':r')) do
      local mkey = room_keys(R)
      local all = redis.call('HGETALL', mkey)
      for i = 1, #all, 2 do
        local rec = cjson.decode(all[i + 1])
        if rec.n == node and rec.h == 0 then
          rec.h = now + grace
          rec.r = 'node_lost'
          rec.o = 1  -- what the dead node had sent was never confirmed: recovered false
          redis.call('HSET', mkey, all[i], cjson.encode(rec))
          redis.call('ZADD', 'sig:held', rec.h, R .. '\0' .. all[i])
        end
      end
    end
    redis.call('DEL', 'sig:n:' .. node .. ':r')
  end
end
give_back_webhooks(1000)
local reply = {redis.call('HLEN', 'sig:nodes')}
for i = 1, #released do reply[#reply + 1] = released[i] end
return reply
"""

# Re-register this node's slots in one room after Redis lost them (restarted
# empty) or after this node was wrongly found dead. The node's own view is the
# truth for its own slots: missing ones are added (live, or held with what
# remains of their grace), records of this node that it no longer has are
# removed. Users that left this node while Redis was away (``gone``) are
# announced to the other nodes even when Redis lost their record.
# Webhooks: participant_left for each of those leaves (the backend heard of
# their join); none for the slots added back (it heard of them too). If the
# room is empty afterwards, its room_finished waits ``settle`` ms for the other
# nodes to re-register their members (REAP sends it; a re-registration that
# brings members back, or a new first join, cancels or precedes it).
# ARGV: room, node, slots-json [[user, username, epoch, held_ms_left or 0, lost 0/1], ...],
# gone-json [[user, username, reason], ...], settle_ms
# -> {version, members-json, [user, [username, reason]-json, ...] of who left during the outage}
RESTORE = r"""
local R, node = ARGV[1], ARGV[2]
local left = 0
local mkey, vkey = room_keys(R)
local gkey = 'sig:{' .. R .. '}:g'

local mine = {}
local now = now_ms()
for _, s in ipairs(cjson.decode(ARGV[3])) do
  local U = s[1]
  mine[U] = true
  local raw = redis.call('HGET', mkey, U)
  local rec = raw and cjson.decode(raw)
  if not rec or (rec.n == node and rec.c <= s[3]) then
    local seq = rec and rec.s or bump(vkey)
    -- A loss Redis already knows of stays known (KEEP may have marked it).
    local lost = (rec and rec.c == s[3] and rec.o == 1) and 1 or s[5]
    local bytes = (rec and rec.c == s[3]) and rec.b or 0
    local joined = rec and rec.j or now
    rec = {u = s[2], n = node, s = seq, c = s[3], h = 0, o = lost, b = bytes, r = 'timeout', j = joined}
    if s[4] > 0 then
      rec.h = now + s[4]
      redis.call('ZADD', 'sig:held', rec.h, R .. '\0' .. U)
    end
    redis.call('HSET', mkey, U, cjson.encode(rec))
    if not raw then
      local ver = bump(vkey)
      emit(mkey, node, '', 'j', {r = R, u = U, name = s[2], n = node, v = ver, s = seq, q = 1})
    end
  end
end
local why = {}
for _, g in ipairs(cjson.decode(ARGV[4])) do
  if not mine[g[1]] then
    why[g[1]] = g[3]
    if not redis.call('HGET', mkey, g[1]) then
      local ver = bump(vkey)
      emit(mkey, node, '', 'l', {r = R, u = g[1], name = g[2], why = g[3], v = ver})
      webhook('participant_left', R, g[1], g[2], g[3])
      left = left + 1
      -- Nodes that re-register after this one learn it from the reply instead.
      redis.call('HSET', gkey, g[1], cjson.encode({g[2], g[3]}))
      redis.call('PEXPIRE', gkey, 60000)
    end
  end
end
local all = redis.call('HGETALL', mkey)
for i = 1, #all, 2 do
  local rec = cjson.decode(all[i + 1])
  if rec.n == node and not mine[all[i]] then
    redis.call('HDEL', mkey, all[i])
    redis.call('DEL', kept_key(R, all[i]))
    redis.call('ZREM', 'sig:held', R .. '\0' .. all[i])
    local ver = bump(vkey)
    emit(mkey, node, '', 'l', {r = R, u = all[i], name = rec.u, why = why[all[i]] or 'left', v = ver})
    webhook('participant_left', R, all[i], rec.u, why[all[i]] or 'left')
    left = left + 1
  end
end
redis.call('SADD', 'sig:n:' .. node .. ':r', R)
if redis.call('HLEN', mkey) > 0 then
  redis.call('SET', 'sig:{' .. R .. '}:c', now, 'NX')
  redis.call('ZREM', 'sig:wh:fin', R)
elseif left > 0 then
  redis.call('ZADD', 'sig:wh:fin', now + tonumber(ARGV[5]), R)
end
forget_node_room(mkey, vkey, node, R)
return {tonumber(redis.call('GET', vkey) or '0'), members(mkey), redis.call('HGETALL', gkey)}
"""

# Room service: remove a participant wherever it is (live or held), now; its
# node closes it with KICKED, every node tells its members (reason kicked).
# ARGV: room, user, ban_ms (0: no ban), grace_ms -> 1 removed, 0 no such participant
KICK = r"""
local R, U, ban, grace = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4] or '0')
local mkey, vkey = room_keys(R)
local raw = redis.call('HGET', mkey, U)
if not raw then return 0 end
local rec = cjson.decode(raw)
if ban > 0 then redis.call('SET', 'sig:{' .. R .. '}:ban:' .. U, '1', 'PX', ban) end
if grace > 0 then redis.call('SET', 'sig:{' .. R .. '}:out:' .. U, 'KICKED', 'PX', grace) end
redis.call('HDEL', mkey, U)
redis.call('DEL', kept_key(R, U))
redis.call('ZREM', 'sig:held', R .. '\0' .. U)
local ver = bump(vkey)
emit(mkey, '', rec.n, 'l', {r = R, u = U, name = rec.u, why = 'kicked', v = ver})
webhook('participant_left', R, U, rec.u, 'kicked')
finished_if_empty(mkey, R)
forget_node_room(mkey, vkey, rec.n, R)
return 1
"""

# Room service: end a room; every node with members closes them with ROOM_CLOSED.
# A join that Redis runs after this opens the room again (unless banned, or by one of
# its members within the grace): its version counts on from the close's (sig:vmax),
# so its node keeps it even if it hears the close later; a join Redis ran before is
# closed by its node, whenever it hears it.
# ARGV: room, ban_ms (0: the room may be reopened at once, by others than its members
# for the grace), grace_ms -> participants removed
CLOSE = r"""
local R, ban, grace = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3] or '0')
local mkey, vkey = room_keys(R)
local all = redis.call('HGETALL', mkey)
if #all == 0 then return 0 end
if ban > 0 then redis.call('SET', 'sig:{' .. R .. '}:closed', '1', 'PX', ban) end
local targets = nodes_of(mkey)
for i = 1, #all, 2 do
  local rec = cjson.decode(all[i + 1])
  redis.call('DEL', kept_key(R, all[i]))
  redis.call('ZREM', 'sig:held', R .. '\0' .. all[i])
  redis.call('SREM', 'sig:n:' .. rec.n .. ':r', R)
  if grace > 0 then redis.call('SET', 'sig:{' .. R .. '}:out:' .. all[i], 'ROOM_CLOSED', 'PX', grace) end
  webhook('participant_left', R, all[i], rec.u, 'room_closed')
end
webhook('room_finished', R)
local ver = bump(vkey)
redis.call('DEL', mkey)
retire(vkey, R)
local msg = 'x' .. cjson.encode({r = R, v = ver}) .. '\n'
for node, _ in pairs(targets) do redis.call('PUBLISH', 'sig:ch:' .. node, msg) end
return #all / 2
"""

# Room service: a server_message (already encoded) to the nodes with members,
# or to one participant: to its node when live, else kept for its resume like a
# relayed frame (KEEP's rules and bounds).
# ARGV: room, target user or '', frame, max kept count, max kept bytes
# -> 0 nobody there; 1 sent; with a target, 2 kept (held), 3 not kept (held past
# the bounds, or its node died: its resume says recovered false)
SEND = r"""
local R, T, frame = ARGV[1], ARGV[2], ARGV[3]
local mkey = room_keys(R)
if T ~= '' then
  if redis.call('HEXISTS', mkey, T) == 0 then return 0 end
  local kept = keep(R, T, '', frame, tonumber(ARGV[4]), tonumber(ARGV[5]))
  if kept == 2 then return 1 end
  if kept == 1 then return 2 end
  return 3
end
if redis.call('HLEN', mkey) == 0 then return 0 end
local header = '{"r":' .. cjson.encode(R) .. ',"s":"","t":null}'
for node, _ in pairs(nodes_of(mkey)) do
  redis.call('PUBLISH', 'sig:ch:' .. node, 'm' .. header .. '\n' .. frame)
end
return 1
"""


# A hand-off marker found nobody on the old node's channel (it stopped, died or
# is cut off): tell the resuming node directly. The frames this node sent there
# since nobody listens went to KEEP, in order, before this (kept or forwarded);
# what the old node received before is its own barrier's business, or the
# resuming node's when the old node was deaf already (JOIN's deaf).
# ARGV: room, user, epoch, new node, this node -> 1
HANDED = r"""
local R, U, epoch, new, me = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local msg = 'd' .. cjson.encode({r = R, u = U, c = epoch, x = me, l = 0}) .. '\n'
redis.call('PUBLISH', 'sig:ch:' .. new, msg)
return 1
"""

# The members of a room and its version, read at once (a node that may have
# missed events while its subscriber was away brings its mirror up to date),
# with the registry's generation: sig:gen is set once, by the first read, to the
# random value every read brings, so a Redis that restarted empty has another one.
# ARGV: room ('' for the generation alone), a new generation if none -> {version, members-json, generation}
MEMBERS = r"""
redis.call('SET', 'sig:gen', ARGV[2], 'NX')
local mkey, vkey = room_keys(ARGV[1])
return {tonumber(redis.call('GET', vkey) or '0'), members(mkey), redis.call('GET', 'sig:gen')}
"""
