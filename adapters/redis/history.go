package redis

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"imcloud/pipeline"
)

// History keeps each stream's positions and last entries in Redis
// (pipeline.History), shared by every logic of a cluster. Keys, under a
// prefix, hash-tagged by stream so that a stream's keys share a Redis
// Cluster slot (issue 16):
//
//	{<stream>}:meta  hash epoch, seq     the epoch and last position
//	                      bytes, fms     what the log holds, its oldest entry's ms
//	                      size, ttl      the last limit
//	                      ack            the acknowledged position (this epoch)
//	                      void           voided positions still kept (historyvoid.go)
//	{<stream>}:log   stream of entries   id "<pos>-<ms>", one field e = the entry
//
// The log is a Redis Stream, not a sorted set: entries are read by
// position (XRANGE from "<after+1>"), appended in position order and
// trimmed from the front (XTRIM MINID), which a stream does in a compact
// listpack where a sorted set pays a skiplist node and a dict entry per
// member (about 100 bytes: half again a 200-byte push). The id's sequence
// part is Redis's clock (TIME) at append, so TTL trimming reads the age
// from the id without decoding the entry.
//
// Append is one Lua script for all its streams: one round trip, each
// stream's step atomic; appends made while others are in flight share one
// call of it (group commit, below). It trims a stream it appends to only
// when the trim is due: the log over the byte cap (at once: the cap is hard, and
// bytes counts every entry the log holds), an entry not kept, the oldest
// entry past its TTL by an eighth of it (its ms kept in the meta, so the
// check reads no entry), or the log past its size by a slack of
// max(16, size/8) entries (XLEN). Since cuts to the exact size and TTL
// first, so readers never see the slack. Trimming on every append read
// up to 16 entries back (bodies included) each time: on the push
// benchmark's shape (TestIntegrationHistoryAppendCost: one room stream at
// 100 entries, 200-byte bodies, 8 goroutines, a private Redis 7.0 on 2
// shared cores) the script took 29-34 µs of Redis time a call then, and
// 14-15.5 µs since, called one at a time or in a pipeline of calls, and
// 10.2-10.5 µs an append since a batch is one call (3.9 appends a call:
// the call's cost, TIME, and the stream's HMGET, HSET and two PEXPIREs
// paid once a batch, not once an append; XADD and XLEN stay per append).
// It sets both keys to expire after the stream's TTL (HistoryCaps.Idle
// with TTL 0): an idle stream expires whole
// — counter, epoch, log and ack cursor — and its next use starts a new
// epoch, so a lost history is always signalled. The epoch and the counter
// are fields of one hash, so they cannot expire apart; a log left without
// its meta is deleted when the meta is created again.
//
// Under Redis Cluster one script may only touch keys of one slot: a stream's
// two keys share its hash tag, and on a *goredis.ClusterClient a batch is
// split by slot — one script call for the streams of each slot, every
// append's streams of that slot in queue order, the calls sent at once in
// one pipeline (go-redis sends each to its node). An Append to streams of
// several slots is then made slot by slot rather than in one atomic step;
// each stream's positions still follow the queue's order. Tops and Void
// are split the same way. On one server (single, Sentinel) a batch stays
// one call.
//
// Round trip (TestIntegrationHistoryThroughput, local Redis 7.0, 200-byte
// bodies, one stream a call, 2 cores shared with other jobs): one call a
// round trip, 8 goroutines reached 9k-27k appends/s, 32 goroutines
// 6k-28k/s (load average 5-6). Concurrent appends now share a pipeline
// (group commit, below): 21k-28k/s with 8 goroutines, 40k/s with 32, on a
// private Redis at load average 5-7. In the push benchmark (BENCHMARKS.md
// "History on vs off", Redis) that took the server's CPU per room push
// with history on from 87-157 µs to 58-63 µs; one script call per batch
// then took the history-on median from 17.7k to 20.9k req/s (−37 % to
// −23 % against history off) and its CPU from 60-66 to 55-60 µs.
type History struct {
	rdb    goredis.UniversalClient
	prefix string
	caps   pipeline.HistoryCaps

	// Appends made while others are on their way to Redis go together,
	// in one script call that makes them in the order they were queued:
	// one round trip, and Redis's per-call cost paid once, for all of
	// them (group commit).
	mu       sync.Mutex
	queued   []*appendCall
	flushing bool // a goroutine is sending queued appends

	// waitReplicas, when above 0, is how many replicas must have a
	// batch's appends before its positions are given (WAIT, for at most
	// waitTimeout): WithReplicaWait.
	waitReplicas int
	waitTimeout  time.Duration

	// The flushing goroutine's buffers for a batch's script call (go-redis
	// copies them into its command), reused from batch to batch.
	keys []string
	args []any
}

// appendCall is one Append waiting for its batch.
type appendCall struct {
	ctx     context.Context // the caller's: one that gave up is not sent
	streams []string
	entry   []byte
	limits  []int64 // size and TTL ms of each stream
	done    chan struct{}
	res     []any // {epoch, position} of each stream
	err     error
}

// maxAppendBatch bounds the appends of one batch; maxBatchStreams bounds
// its streams (a batch takes at least one append, whatever its streams):
// one script call of MaxHistoryStreams streams takes Redis ~1 ms.
const (
	maxAppendBatch  = 128
	maxBatchStreams = pipeline.MaxHistoryStreams
)

// appendTimeout bounds one batch: it runs apart from its callers (each
// waits on its own context), so none of their deadlines can stop it.
const appendTimeout = 5 * time.Second

// NewHistory returns a store in rdb under prefix within caps (a field ≤ 0:
// its default).
func NewHistory(rdb goredis.UniversalClient, prefix string, caps pipeline.HistoryCaps) *History {
	return &History{rdb: rdb, prefix: prefix, caps: caps.Normalized()}
}

// WithReplicaWait makes every batch of appends wait until replicas
// replicas have it (registry.redis.wait_replicas), for at most timeout;
// one that times out fails, and its pushes with it (503). Without it a
// position given just before the master died may be given again by the
// promoted replica, and the cloud node takes the second message for a
// copy of the first. It returns h; call it before the first Append.
func (h *History) WithReplicaWait(replicas int, timeout time.Duration) *History {
	h.waitReplicas, h.waitTimeout = replicas, timeout
	return h
}

func (h *History) metaKey(stream string) string { return h.prefix + "{" + stream + "}:meta" }
func (h *History) logKey(stream string) string  { return h.prefix + "{" + stream + "}:log" }

// newEpoch is a stream's epoch: 64 random bits. Redis uses it only when
// the stream has none.
func newEpoch() string { return fmt.Sprintf("%016x", rand.Uint64()) }

// newEpochs is a batch's 48 random bits (12 hex digits) that the append
// script completes with a 16-bit count into the epoch of each stream it
// creates: one random number a batch instead of a formatted epoch per
// stream per append, used only when a stream is new. A batch creates at
// most maxBatchStreams + MaxHistoryStreams < 65,536 streams.
func newEpochs() string { return fmt.Sprintf("%012x", rand.Uint64()>>16) }

// historyLua is shared by the scripts: the clock, the id parser, the
// creation of a stream's state and the trimming of its log.
const historyLua = `
local OVERHEAD = 64 -- pipeline.EntryOverhead, checked by TestHistoryLuaOverhead
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function parse(id)
  local d = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, d - 1)), tonumber(string.sub(id, d + 1))
end
-- create starts a stream's state in a new epoch; a log left over from the
-- last one is dropped.
local function create(meta, log, epoch, life)
  redis.call('DEL', meta, log)
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0, 'bytes', 0, 'ttl', 0)
  redis.call('PEXPIRE', meta, life)
end
-- trim drops the log's oldest entries while their position is <= cut,
-- the log holds more than maxBytes or they are ttl ms old (ttl > 0), reading
-- count entries at a time, and returns the bytes left and the oldest kept
-- entry's ms (0: the log is empty).
local function trim(log, cut, bytes, maxBytes, ttl, now, count)
  local start, keep, dropped = '-', nil, false
  while true do
    local r = redis.call('XRANGE', log, start, '+', 'COUNT', count)
    if #r == 0 then break end
    for _, e in ipairs(r) do
      local pos, ms = parse(e[1])
      if pos > cut and bytes <= maxBytes and (ttl <= 0 or now - ms < ttl) then
        keep = e[1]
        break
      end
      bytes = bytes - (#e[2][2] + OVERHEAD)
      dropped = true
    end
    if keep then break end
    start = '(' .. r[#r][1]
  end
  if dropped then
    if keep then redis.call('XTRIM', log, 'MINID', keep) else redis.call('DEL', log) end
  end
  if not keep then return 0, 0 end
  local _, ms = parse(keep)
  return bytes, ms
end
-- slack is how many entries past its size a log may hold before an
-- append trims it: trimming every append read entries back each time.
local function slack(size)
  return math.max(16, math.floor(size / 8))
end
`

// appendScript makes a batch of appends, in order. KEYS meta, log of each
// stream of each append; ARGV max bytes, idle ms, the batch's epoch
// prefix (newEpochs), then for each append its number of streams, its
// entry and each stream's size and TTL ms. Returns for each append
// {epoch, position} of each of its streams.
//
// A stream's meta is read once a batch and written once at its end
// (HMGET, HSET and two PEXPIREs a stream, not an append): the script is
// atomic, so nobody sees the meta between. Each append still XADDs its
// entry and trims when due, as it did alone, so the log is the one
// appends made one by one would leave.
var appendScript = goredis.NewScript(historyLua + `
local now = now_ms()
local maxBytes, idle, fresh = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local made, state, order, out = 0, {}, {}, {}
local k, a = 1, 4
while a <= #ARGV do
  local n, blob = tonumber(ARGV[a]), ARGV[a + 1]
  a = a + 2
  local size = #blob + OVERHEAD
  local res = {}
  for i = 1, n do
    local meta, log = KEYS[k], KEYS[k + 1]
    local keep, ttl = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
    k, a = k + 2, a + 2
    local st = state[meta]
    if not st then
      local m = redis.call('HMGET', meta, 'epoch', 'seq', 'bytes', 'fms')
      st = {log = log, epoch = m[1], seq = tonumber(m[2] or 0), bytes = tonumber(m[3] or 0), fms = tonumber(m[4] or 0)}
      if not st.epoch then
        made = made + 1
        st.epoch, st.seq, st.bytes, st.fms = fresh .. string.format('%04x', made), 0, 0, 0
        create(meta, log, st.epoch, idle)
      end
      state[meta] = st
      order[#order + 1] = meta
    end
    st.seq = st.seq + 1
    if size > maxBytes then keep = 0 end
    if keep > 0 then
      redis.call('XADD', log, string.format('%d-%d', st.seq, now), 'e', blob)
      if st.bytes == 0 then st.fms = now end
      st.bytes = st.bytes + size
    end
    -- Trim only when due: over the byte cap, an entry not kept (a history
    -- has no hole), the oldest entry past its TTL by an eighth, or the log
    -- past its size by slack entries. Since cuts to the exact size and TTL.
    if st.bytes > 0 then
      local count = 0
      if st.bytes > maxBytes or keep == 0 or st.fms == 0 or (ttl > 0 and now - st.fms >= ttl + ttl / 8) then
        count = 16
      else
        local over = redis.call('XLEN', log) - keep
        if over > slack(keep) then count = math.min(over + 1, 256) end
      end
      if count > 0 then st.bytes, st.fms = trim(log, st.seq - keep, st.bytes, maxBytes, ttl, now, count) end
    end
    st.keep, st.ttl = keep, ttl
    res[i] = {st.epoch, st.seq}
  end
  out[#out + 1] = res
end
for _, meta in ipairs(order) do
  local st = state[meta]
  redis.call('HSET', meta, 'seq', st.seq, 'bytes', st.bytes, 'ttl', st.ttl, 'size', st.keep, 'fms', st.fms)
  local life = st.ttl
  if life <= 0 then life = idle end
  redis.call('PEXPIRE', meta, life)
  redis.call('PEXPIRE', st.log, life)
end
return out`)

// sinceScript: KEYS meta, log; ARGV epoch, after, max, a new epoch, the
// life of a stream a read creates (HistoryCaps.ReadIdle: a read of any
// name must not keep a key for a day; an append gives it its own), idle
// ms, max bytes. Returns {epoch, top, status, entries, void positions}.
var sinceScript = goredis.NewScript(historyLua + `
local meta, log = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'epoch', 'seq', 'bytes', 'ttl', 'size', 'void')
if not m[1] then
  create(meta, log, ARGV[4], tonumber(ARGV[5]))
  m = {ARGV[4], '0', '0', '0', '0'}
end
local epoch, seq, bytes, ttl = m[1], tonumber(m[2]), tonumber(m[3]), tonumber(m[4])
-- Appends leave up to slack entries past the size: cut them here.
local cut = 0
if m[5] then cut = seq - tonumber(m[5]) end
local left, fms = trim(log, cut, bytes, tonumber(ARGV[6]), ttl, now_ms(), 16)
if left ~= bytes then redis.call('HSET', meta, 'bytes', left, 'fms', fms) end
local want, after = ARGV[1], tonumber(ARGV[2])
local first = seq + 1
local f = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)
if #f > 0 then first = parse(f[1][1]) end
if want == '' and after == 0 then
  after = first - 1
elseif want ~= epoch then
  return {epoch, seq, 'epoch'}
elseif after > seq then
  return {epoch, seq, 'future'}
elseif after + 1 < first then
  return {epoch, seq, 'trimmed'}
end
if after >= seq then return {epoch, seq, 'ok', {}} end
return {epoch, seq, 'ok', redis.call('XRANGE', log, string.format('%d', after + 1), '+', 'COUNT', tonumber(ARGV[3])), m[6] or ''}`)

// topsScript: KEYS meta, log of each stream; ARGV idle ms, then a new
// epoch for each stream. Returns {epoch, top, acked} for each stream.
var topsScript = goredis.NewScript(historyLua + `
local out = {}
for i = 1, #KEYS / 2 do
  local meta, log = KEYS[2 * i - 1], KEYS[2 * i]
  local m = redis.call('HMGET', meta, 'epoch', 'seq', 'ack')
  if not m[1] then
    create(meta, log, ARGV[1 + i], tonumber(ARGV[1]))
    m = {ARGV[1 + i], 0, 0}
  end
  out[i] = {m[1], tonumber(m[2] or 0), tonumber(m[3] or 0)}
end
return out`)

// ackScript: KEYS meta; ARGV epoch, position. Returns a status.
var ackScript = goredis.NewScript(`
local m = redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'ack')
if not m[1] or m[1] ~= ARGV[1] then return 'epoch' end
local pos = tonumber(ARGV[2])
if pos > tonumber(m[2]) then return 'future' end
if pos > tonumber(m[3] or 0) then redis.call('HSET', KEYS[1], 'ack', ARGV[2]) end
return 'ok'`)

// Append gives e the next position in each of streams (pipeline.History),
// in one round trip.
func (h *History) Append(ctx context.Context, streams []string, e pipeline.HistoryEntry, limit func(stream string) pipeline.StreamLimit) ([]pipeline.StreamPos, error) {
	if err := pipeline.CheckHistoryStreams(streams); err != nil {
		return nil, fmt.Errorf("history append: %w", err)
	}
	if len(streams) == 0 {
		return []pipeline.StreamPos{}, nil
	}
	limits := make([]int64, 0, 2*len(streams))
	for _, s := range streams {
		l := limit(s)
		limits = append(limits, int64(min(max(l.Size, 0), h.caps.MaxSize)), max(l.TTL.Milliseconds(), 0))
	}
	res, err := h.run(ctx, &appendCall{ctx: ctx, streams: streams, entry: encodeEntry(e), limits: limits, done: make(chan struct{})})
	if err != nil {
		return nil, fmt.Errorf("history append to %d streams: %w", len(streams), err)
	}
	if len(res) != len(streams) {
		return nil, fmt.Errorf("history append: %d results for %d streams", len(res), len(streams))
	}
	out := make([]pipeline.StreamPos, len(streams))
	for i, r := range res {
		epoch, pos, err := epochPos(r)
		if err != nil {
			return nil, fmt.Errorf("history append %s: %w", streams[i], err)
		}
		out[i] = pipeline.StreamPos{Stream: streams[i], Epoch: epoch, Pos: pos}
	}
	return out, nil
}

// run queues an append and waits for its batch.
func (h *History) run(ctx context.Context, c *appendCall) ([]any, error) {
	h.mu.Lock()
	h.queued = append(h.queued, c)
	if !h.flushing {
		h.flushing = true
		go h.flush(context.WithoutCancel(ctx))
	}
	h.mu.Unlock()
	select {
	case <-c.done:
		return c.res, c.err
	case <-ctx.Done():
		// The append may still be made: its position is then skipped,
		// as when a call is cut short on the wire.
		return nil, ctx.Err()
	}
}

// flush sends the queued appends, a batch at a time, until none is left.
func (h *History) flush(ctx context.Context) {
	for {
		h.mu.Lock()
		n, streams := 0, 0
		for n < min(len(h.queued), maxAppendBatch) && (n == 0 || streams+len(h.queued[n].streams) <= maxBatchStreams) {
			streams += len(h.queued[n].streams)
			n++
		}
		if n == 0 {
			h.flushing = false
			h.mu.Unlock()
			return
		}
		batch := h.queued[:n:n]
		h.queued = h.queued[n:]
		h.mu.Unlock()
		bctx, cancel := context.WithTimeout(ctx, appendTimeout)
		h.send(bctx, slices.Clone(batch))
		cancel()
		for _, c := range batch {
			close(c.done)
		}
	}
}

// send makes a batch's appends in one script call, or one a slot under
// Redis Cluster (EVALSHA, loading the script if Redis does not know it:
// it was flushed or restarted). An error fails every append of the call;
// those the script made before it failed keep their positions, skipped,
// as when a call is cut short on the wire.
func (h *History) send(ctx context.Context, batch []*appendCall) {
	// A caller that gave up while queued (its request timed out, say
	// while Redis was slow) gets no position: calls nobody waits for
	// would otherwise pile up behind an outage.
	batch = slices.DeleteFunc(batch, func(c *appendCall) bool {
		c.err = c.ctx.Err()
		return c.err != nil
	})
	if len(batch) == 0 {
		return
	}
	groups := h.appendGroups(batch)
	calls := make([]scriptCall, len(groups))
	for i, g := range groups {
		calls[i] = g.scriptCall
	}
	var cmds []*goredis.Cmd
	if h.waitReplicas > 0 {
		cmds = runScriptsWait(ctx, h.rdb, appendScript, calls, h.waitReplicas, h.waitTimeout)
	} else {
		cmds = runScripts(ctx, h.rdb, appendScript, calls)
	}
	if !clustered(h.rdb) {
		// Drop the references to the batch's keys and entries, and keep
		// the buffers for the next batch.
		g := groups[0]
		clear(g.keys)
		clear(g.args)
		h.keys, h.args = g.keys[:0], g.args[:0]
	}
	for _, c := range batch {
		c.res = make([]any, len(c.streams))
	}
	for i, g := range groups {
		res, err := cmds[i].Slice()
		if errors.Is(err, errReplicaWait) {
			// Made, but no replica has it: its positions are voided
			// below, like those of the slots that did answer when
			// another failed.
			res, _ = cmds[i].Val().([]any)
		}
		if res != nil && len(res) != len(g.parts) {
			err, res = cmp.Or(err, fmt.Errorf("%d results for a batch of %d appends", len(res), len(g.parts))), nil
		}
		for j, part := range g.parts {
			c := batch[part.call]
			if err != nil {
				c.err = cmp.Or(c.err, err)
			}
			if res == nil {
				continue
			}
			r, _ := res[j].([]any)
			if len(r) != len(part.streams) {
				c.err = cmp.Or(c.err, fmt.Errorf("%d results for an append to %d streams", len(r), len(part.streams)))
				continue
			}
			for k, si := range part.streams {
				c.res[si] = r[k]
			}
		}
	}
	h.voidFailed(ctx, batch)
}

// voidFailed voids the positions a failed append took all the same — in
// the slots that answered when another did not, or where the append was
// made but no replica confirmed it (WAIT) — so that a push answered 503
// is not delivered later by a gap fill or a history read (pipeline.History:
// no position of a failed Append may deliver its entry). One that cannot
// be voided says so in the append's error.
func (h *History) voidFailed(ctx context.Context, batch []*appendCall) {
	for _, c := range batch {
		if c.err == nil {
			continue
		}
		var taken []pipeline.StreamPos
		for i, r := range c.res {
			if epoch, pos, err := epochPos(r); r != nil && err == nil {
				taken = append(taken, pipeline.StreamPos{Stream: c.streams[i], Epoch: epoch, Pos: pos})
			}
		}
		c.res = nil
		if len(taken) == 0 {
			continue
		}
		if err := h.Void(ctx, taken); err != nil {
			c.err = fmt.Errorf("%w; the %d positions it took are not voided: %w", c.err, len(taken), err)
		}
	}
}

// appendGroup is one call of the append script: its keys and arguments,
// and the appends it makes (all of a batch, or their streams of one slot
// under Redis Cluster).
type appendGroup struct {
	scriptCall
	parts []appendPart
}

// appendPart is the share of one append that a call makes: the append's
// index in its batch, the indexes of its streams there, and where its
// stream count is among the call's arguments.
type appendPart struct {
	call     int
	streams  []int
	countArg int
}

// appendGroups lays a batch out as calls of the append script: one on one
// server, one a slot under Redis Cluster.
func (h *History) appendGroups(batch []*appendCall) []*appendGroup {
	cluster := clustered(h.rdb)
	var groups []*appendGroup
	var bySlot map[int]*appendGroup
	if cluster {
		bySlot = map[int]*appendGroup{}
	}
	for ci, c := range batch {
		for si, s := range c.streams {
			var g *appendGroup
			switch {
			case cluster:
				slot := keySlot(h.metaKey(s))
				if g = bySlot[slot]; g == nil {
					g = &appendGroup{}
					bySlot[slot] = g
				}
			case len(groups) == 1:
				g = groups[0]
			default:
				g = &appendGroup{scriptCall: scriptCall{keys: h.keys[:0], args: h.args[:0]}}
			}
			if len(g.args) == 0 {
				g.args = append(g.args, h.caps.MaxBytes, h.caps.Idle.Milliseconds(), newEpochs())
				groups = append(groups, g)
			}
			if n := len(g.parts); n == 0 || g.parts[n-1].call != ci {
				g.parts = append(g.parts, appendPart{call: ci, countArg: len(g.args)})
				g.args = append(g.args, 0, c.entry)
			}
			part := &g.parts[len(g.parts)-1]
			part.streams = append(part.streams, si)
			g.args[part.countArg] = len(part.streams)
			g.keys = append(g.keys, h.metaKey(s), h.logKey(s))
			g.args = append(g.args, c.limits[2*si], c.limits[2*si+1])
		}
	}
	return groups
}

// streamGroups splits streams (by index) into those one script call may
// touch together: all of them on one server, those of one slot under
// Redis Cluster.
func (h *History) streamGroups(streams []string) [][]int {
	if !clustered(h.rdb) {
		all := make([]int, len(streams))
		for i := range all {
			all[i] = i
		}
		return [][]int{all}
	}
	var groups [][]int
	bySlot := map[int]int{}
	for i, s := range streams {
		slot := keySlot(h.metaKey(s))
		g, ok := bySlot[slot]
		if !ok {
			g = len(groups)
			bySlot[slot] = g
			groups = append(groups, nil)
		}
		groups[g] = append(groups[g], i)
	}
	return groups
}

// Since returns up to max entries of stream after position after
// (pipeline.History).
func (h *History) Since(ctx context.Context, stream, epoch string, after uint64, max int) ([]pipeline.HistoryEntry, pipeline.StreamPos, error) {
	if err := pipeline.CheckStream(stream); err != nil {
		return nil, pipeline.StreamPos{}, fmt.Errorf("history since: %w", err)
	}
	if max <= 0 || max > pipeline.MaxHistorySince {
		max = pipeline.MaxHistorySince
	}
	res, err := sinceScript.Run(ctx, h.rdb, []string{h.metaKey(stream), h.logKey(stream)},
		epoch, strconv.FormatUint(after, 10), max, newEpoch(), h.caps.ReadIdle.Milliseconds(), h.caps.MaxBytes).Slice()
	if err != nil {
		return nil, pipeline.StreamPos{}, fmt.Errorf("history since %s: %w", stream, err)
	}
	if len(res) < 3 {
		return nil, pipeline.StreamPos{}, fmt.Errorf("history since %s: reply of %d items", stream, len(res))
	}
	cur, pos, err := epochPos(res[:2])
	if err != nil {
		return nil, pipeline.StreamPos{}, fmt.Errorf("history since %s: %w", stream, err)
	}
	top := pipeline.StreamPos{Stream: stream, Epoch: cur, Pos: pos}
	switch status, _ := res[2].(string); status {
	case "ok":
	case "epoch":
		return nil, top, fmt.Errorf("history %s: epoch %q, now %q: %w", stream, epoch, cur, pipeline.ErrEpochChanged)
	case "future":
		return nil, top, fmt.Errorf("history %s: position %d, top %d: %w", stream, after, pos, pipeline.ErrFuturePosition)
	case "trimmed":
		return nil, top, fmt.Errorf("history %s: position %d: %w", stream, after, pipeline.ErrTrimmed)
	default:
		return nil, top, fmt.Errorf("history since %s: status %v", stream, res[2])
	}
	var raw []any
	if len(res) > 3 {
		raw, _ = res[3].([]any)
	}
	if len(raw) == 0 {
		return nil, top, nil
	}
	out := make([]pipeline.HistoryEntry, len(raw))
	for i, r := range raw {
		if out[i], err = decodeLogEntry(r); err != nil {
			return nil, top, fmt.Errorf("history since %s: %w", stream, err)
		}
	}
	if len(res) > 4 {
		void, _ := res[4].(string)
		markVoid(out, void)
	}
	return out, top, nil
}

// Tops returns each stream's epoch and last position (pipeline.History).
func (h *History) Tops(ctx context.Context, streams []string) ([]pipeline.StreamPos, error) {
	if err := pipeline.CheckHistoryStreams(streams); err != nil {
		return nil, fmt.Errorf("history tops: %w", err)
	}
	res, err := h.tops(ctx, streams)
	if err != nil {
		return nil, fmt.Errorf("history tops: %w", err)
	}
	out := make([]pipeline.StreamPos, len(streams))
	for i, r := range res {
		out[i] = pipeline.StreamPos{Stream: streams[i], Epoch: r.epoch, Pos: r.top}
	}
	return out, nil
}

type topAck struct {
	epoch    string
	top, ack uint64
}

func (h *History) tops(ctx context.Context, streams []string) ([]topAck, error) {
	if len(streams) == 0 {
		return nil, nil
	}
	groups := h.streamGroups(streams)
	calls := make([]scriptCall, len(groups))
	for i, g := range groups {
		keys := make([]string, 0, 2*len(g))
		args := make([]any, 0, 1+len(g))
		args = append(args, h.caps.ReadIdle.Milliseconds())
		for _, si := range g {
			keys = append(keys, h.metaKey(streams[si]), h.logKey(streams[si]))
			args = append(args, newEpoch())
		}
		calls[i] = scriptCall{keys: keys, args: args}
	}
	cmds := runScripts(ctx, h.rdb, topsScript, calls)
	out := make([]topAck, len(streams))
	for i, g := range groups {
		res, err := cmds[i].Slice()
		if err != nil {
			return nil, err
		}
		if len(res) != len(g) {
			return nil, fmt.Errorf("%d results for %d streams", len(res), len(g))
		}
		for j, si := range g {
			vs, _ := res[j].([]any)
			epoch, top, err := epochPos(vs)
			if err != nil || len(vs) != 3 {
				return nil, fmt.Errorf("stream %s: bad reply %v", streams[si], res[j])
			}
			ack, _ := vs[2].(int64)
			out[si] = topAck{epoch, top, uint64(ack)}
		}
	}
	return out, nil
}

// Ack moves stream's acknowledged position forward to pos
// (pipeline.History).
func (h *History) Ack(ctx context.Context, stream, epoch string, pos uint64) error {
	if err := pipeline.CheckStream(stream); err != nil {
		return fmt.Errorf("history ack: %w", err)
	}
	status, err := ackScript.Run(ctx, h.rdb, []string{h.metaKey(stream)}, epoch, strconv.FormatUint(pos, 10)).Text()
	if err != nil {
		return fmt.Errorf("history ack %s: %w", stream, err)
	}
	switch status {
	case "ok":
		return nil
	case "epoch":
		return fmt.Errorf("history ack %s: epoch %q: %w", stream, epoch, pipeline.ErrEpochChanged)
	case "future":
		return fmt.Errorf("history ack %s: position %d: %w", stream, pos, pipeline.ErrFuturePosition)
	}
	return fmt.Errorf("history ack %s: status %q", stream, status)
}

// Acked returns stream's acknowledged position (pipeline.History).
func (h *History) Acked(ctx context.Context, stream string) (pipeline.StreamPos, error) {
	if err := pipeline.CheckStream(stream); err != nil {
		return pipeline.StreamPos{}, fmt.Errorf("history acked: %w", err)
	}
	res, err := h.tops(ctx, []string{stream})
	if err != nil {
		return pipeline.StreamPos{}, fmt.Errorf("history acked %s: %w", stream, err)
	}
	return pipeline.StreamPos{Stream: stream, Epoch: res[0].epoch, Pos: res[0].ack}, nil
}

// epochPos reads an {epoch, position} reply.
func epochPos(r any) (string, uint64, error) {
	vs, _ := r.([]any)
	if len(vs) < 2 {
		return "", 0, fmt.Errorf("bad reply %v", r)
	}
	epoch, ok1 := vs[0].(string)
	pos, ok2 := vs[1].(int64)
	if !ok1 || !ok2 || epoch == "" || pos < 0 {
		return "", 0, fmt.Errorf("bad reply %v", r)
	}
	return epoch, uint64(pos), nil
}

// An entry in the log: op (4 bytes), At in Unix ns (8; 0: none), the id's
// length (uvarint), the id, the number of keys (uvarint), each key's
// length (uvarint) and the key, the body.
func encodeEntry(e pipeline.HistoryEntry) []byte {
	b := make([]byte, 12, 12+2*binary.MaxVarintLen64+len(e.ID)+pipeline.EntryKeysSize(e.Keys)+len(e.Body))
	binary.BigEndian.PutUint32(b, uint32(e.Op))
	var at int64
	if !e.At.IsZero() {
		at = e.At.UnixNano()
	}
	binary.BigEndian.PutUint64(b[4:], uint64(at))
	b = binary.AppendUvarint(b, uint64(len(e.ID)))
	b = append(b, e.ID...)
	b = binary.AppendUvarint(b, uint64(len(e.Keys)))
	for _, k := range e.Keys {
		b = binary.AppendUvarint(b, uint64(len(k)))
		b = append(b, k...)
	}
	return append(b, e.Body...)
}

var errBadEntry = errors.New("malformed history entry")

// decodeLogEntry reads one XRANGE item: {"<pos>-<ms>", {"e", entry}}.
func decodeLogEntry(r any) (pipeline.HistoryEntry, error) {
	item, _ := r.([]any)
	if len(item) != 2 {
		return pipeline.HistoryEntry{}, errBadEntry
	}
	id, _ := item[0].(string)
	fields, _ := item[1].([]any)
	posText, _, ok := strings.Cut(id, "-")
	pos, err := strconv.ParseUint(posText, 10, 64)
	if !ok || err != nil || len(fields) != 2 {
		return pipeline.HistoryEntry{}, fmt.Errorf("%w: id %q", errBadEntry, id)
	}
	b, _ := fields[1].(string)
	if len(b) < 13 {
		return pipeline.HistoryEntry{}, fmt.Errorf("%w: %d bytes at %d", errBadEntry, len(b), pos)
	}
	e := pipeline.HistoryEntry{Pos: pos, Op: int32(binary.BigEndian.Uint32([]byte(b[:4])))}
	if at := int64(binary.BigEndian.Uint64([]byte(b[4:12]))); at != 0 {
		e.At = time.Unix(0, at)
	}
	rest := b[12:]
	// field reads a uvarint length and that many bytes from rest.
	field := func(what string) (string, error) {
		n, k := binary.Uvarint([]byte(rest[:min(len(rest), binary.MaxVarintLen64)]))
		if k <= 0 || n > uint64(len(rest)-k) {
			return "", fmt.Errorf("%w: %s length at %d", errBadEntry, what, pos)
		}
		f := rest[k : k+int(n)]
		rest = rest[k+int(n):]
		return f, nil
	}
	if e.ID, err = field("id"); err != nil {
		return pipeline.HistoryEntry{}, err
	}
	nkeys, k := binary.Uvarint([]byte(rest[:min(len(rest), binary.MaxVarintLen64)]))
	// Each key takes at least its length's byte: a count past the bytes
	// left is malformed, and cannot make a huge slice.
	if k <= 0 || nkeys > uint64(len(rest)-k) {
		return pipeline.HistoryEntry{}, fmt.Errorf("%w: key count at %d", errBadEntry, pos)
	}
	rest = rest[k:]
	if nkeys > 0 {
		e.Keys = make([]string, nkeys)
		for i := range e.Keys {
			if e.Keys[i], err = field("key"); err != nil {
				return pipeline.HistoryEntry{}, err
			}
		}
	}
	e.Body = []byte(rest)
	return e, nil
}
