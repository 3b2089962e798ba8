package memory

import (
	"bytes"
	"context"
	"fmt"
	"hash/maphash"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"imcloud/pipeline"
)

// historyShards is how many locks the streams are spread over: a push
// locks only its streams' shards, one at a time, so pushes to different
// streams rarely wait on each other. 256 shards of 64 bytes are 16 KiB.
const historyShards = 256

// historySweepEvery is how often a shard looks for streams idle past their
// life. A sweep costs a few ns per stream of the shard (a million streams:
// ~4k a shard, ~20 µs under its lock every 10 s).
const historySweepEvery = 10 * time.Second

// evictLogEvery is how often evictions are logged at most: a flood evicts
// thousands a second, one line a minute says how many.
const evictLogEvery = time.Minute

// History keeps each stream's positions and last entries in this process
// (pipeline.History), for standalone runs and a single logic. Its state
// dies with the process: a restarted process gives every stream a new
// epoch, so clients holding old positions are told their history is lost.
//
// A stream not appended to for its TTL (HistoryCaps.Idle with TTL 0,
// ReadIdle when only read) is forgotten whole — counter, epoch, entries and ack
// cursor — lazily when next used, and by a sweep each shard runs every 10 s
// on its next use, so millions of one-off user streams do not pile up.
// Its next use starts a new epoch at position 1: a lost history, which the
// epoch signals as such.
//
// The whole store is capped (HistoryCaps.MaxStreams, MaxTotalBytes): a
// backend pushing to millions of one-off mids costs at most the caps. Past
// a cap the least recently appended stream is evicted, as if idle: whole,
// its next use a new epoch. Each shard keeps its streams in a list by last
// Append (a move to its front costs two pointer swaps under the lock the
// Append holds anyway) and evicts its own oldest; when it has none but the
// stream at hand, other shards evict theirs in turn. So eviction is LRU
// within a shard and approximate across the store: streams hash evenly
// over 256 shards, each shard's oldest is among the store's oldest. The
// totals are two atomic counters, checked after each change. Evictions are
// counted (Evictions) and logged at most once a minute. Measured, runs
// interleaved with the store before the caps on the same 2 loaded cores:
// 0.54M-1.19M appends/s over 1,000 streams against 0.49M-1.44M before,
// the same within the machine's noise.
//
// A read (Tops, Since, Acked) of a stream never seen creates it, so that
// the epoch a connection is given at connect is the one its first message
// keeps — but only for HistoryCaps.ReadIdle (a minute), and at the old end
// of its shard's list, first to be evicted: reads of made-up streams (GET
// /im/history, connect-time Tops of any id) neither live for a day nor
// push out streams that hold messages. An Append gives it its full life.
//
// Throughput (BenchmarkHistoryAppend, 2 shared cores, 200-byte bodies,
// 3 allocations an append; runs vary with the machine's other load):
// 0.66M-1.06M appends/s spread over 1,000 streams and 1.8M-2.4M/s all to
// one stream (~1-1.5 µs and ~0.4-0.6 µs each), against the ~29k pushes/s
// of the standalone push path today (~34 µs a push): under 5 % of a push.
type History struct {
	caps       pipeline.HistoryCaps
	now        func() time.Time
	seed       maphash.Seed
	sweepEvery time.Duration
	log        *slog.Logger
	shards     [historyShards]historyShard

	// The store's totals against its caps: streams, and bytes as counted
	// for MaxTotalBytes (memStream.cost).
	count, bytes atomic.Int64
	evicted      atomic.Uint64
	logged       atomic.Uint64 // evictions already logged
	loggedAt     atomic.Int64  // when, unix ns
	evictNext    atomic.Uint32 // the next shard asked to evict for another
}

type historyShard struct {
	mu      sync.Mutex
	streams map[string]*memStream
	// newest and oldest end the shard's streams listed by last Append;
	// streams only read so far sit at the oldest end.
	newest, oldest *memStream
	swept          time.Time
	_              [8]byte // a shard to a 64-byte cache line: no false sharing
}

// memStream is one stream's state; its shard's lock guards it.
type memStream struct {
	name    string // its key in the shard's map
	epoch   string
	seq     uint64
	acked   uint64
	ents    []memEntry // kept entries, oldest first, from off
	off     int
	bytes   int
	ttl     time.Duration // the last Append's limit, for trimming on reads
	touched time.Time     // created or last appended to
	life    time.Duration // forgotten life after touched
	counted int           // its share of History.bytes: cost() when last synced

	newer, older *memStream // its shard's list by last Append
}

type memEntry struct {
	pos    uint64
	stored time.Time
	e      *pipeline.HistoryEntry // shared by the streams of one Append
	size   int
}

// NewHistory returns an empty store within caps (a field ≤ 0: its
// default), logging evictions to slog.Default().
func NewHistory(caps pipeline.HistoryCaps) *History {
	return NewHistoryLogged(caps, slog.Default())
}

// NewHistoryLogged is NewHistory logging evictions to logger.
func NewHistoryLogged(caps pipeline.HistoryCaps, logger *slog.Logger) *History {
	h := &History{caps: caps.Normalized(), now: time.Now, seed: maphash.MakeSeed(), sweepEvery: historySweepEvery, log: logger}
	now := time.Now()
	for i := range h.shards {
		h.shards[i].streams = map[string]*memStream{}
		h.shards[i].swept = now
	}
	return h
}

// newEpoch is a stream's epoch: 64 random bits, never reused in practice.
func newEpoch() string { return fmt.Sprintf("%016x", rand.Uint64()) }

func (h *History) shard(stream string) *historyShard {
	return &h.shards[maphash.String(h.seed, stream)%historyShards]
}

// lock locks stream's shard, sweeping it if due, and returns the stream's
// state: created (with a new epoch) when create is set and it is missing
// or past its life, else nil for those. A stream created here lives
// ReadIdle at its shard's oldest end until an Append (appended) moves it.
// The caller ends with h.unlock.
func (h *History) lock(stream string, now time.Time, create bool) (*historyShard, *memStream) {
	sh := h.shard(stream)
	sh.mu.Lock()
	if now.Sub(sh.swept) >= h.sweepEvery {
		for _, st := range sh.streams {
			if st.expired(now) {
				h.drop(sh, st)
			}
		}
		sh.swept = now
	}
	st := sh.streams[stream]
	if st != nil && st.expired(now) {
		h.drop(sh, st)
		st = nil
	}
	if st == nil && create {
		st = &memStream{name: stream, epoch: newEpoch(), touched: now, life: h.caps.ReadIdle}
		sh.streams[stream] = st
		sh.pushOldest(st)
		st.counted = st.cost()
		h.count.Add(1)
		h.bytes.Add(int64(st.counted))
	}
	return sh, st
}

// unlock enforces the store's caps and unlocks sh: it evicts sh's least
// recently appended streams but keep (the stream the call is about) while
// the store is over a cap, then, if sh has none left, other shards'.
//
// A stream only read so far (seq 0) never pushes out one that holds
// messages: rather than that, it is forgotten itself (the read's answer
// stands; its first Append starts another epoch, which tells a client a
// history of nothing was lost). So a flood of reads of made-up streams
// at the cap only churns such streams.
func (h *History) unlock(sh *historyShard, keep *memStream) {
	if keep != nil {
		h.sync(keep)
	}
	readOnly := keep != nil && keep.seq == 0
	for h.over() {
		v := sh.oldest
		if v != nil && v == keep {
			v = v.newer
		}
		if readOnly && (v == nil || v.seq > 0) {
			h.evict(sh, keep)
			break
		}
		if v == nil {
			break
		}
		h.evict(sh, v)
	}
	sh.mu.Unlock()
	if readOnly {
		return
	}
	// One shard at a time, never two locks held: no lock order to keep.
	for misses := 0; misses < historyShards && h.over(); {
		o := &h.shards[h.evictNext.Add(1)%historyShards]
		if o == sh {
			misses++
			continue
		}
		o.mu.Lock()
		if v := o.oldest; v != nil {
			h.evict(o, v)
			misses = 0
		} else {
			misses++
		}
		o.mu.Unlock()
	}
}

// sync counts st's change in cost since it was last counted: whatever
// changed its entries (append, trim, void) is counted when its caller
// unlocks. A stream at its size trims one entry per entry appended: the
// change is then mostly 0, and the shared counter's cache line is left
// alone.
func (h *History) sync(st *memStream) {
	if d := st.cost() - st.counted; d != 0 {
		h.bytes.Add(int64(d))
		st.counted += d
	}
}

func (h *History) over() bool {
	return h.count.Load() > int64(h.caps.MaxStreams) || h.bytes.Load() > int64(h.caps.MaxTotalBytes)
}

// drop forgets st, which sh holds locked.
func (h *History) drop(sh *historyShard, st *memStream) {
	delete(sh.streams, st.name)
	sh.unlink(st)
	h.count.Add(-1)
	h.bytes.Add(-int64(st.counted))
}

// evict drops st to bring the store under its caps, counts it and logs
// the evictions at most once a minute.
func (h *History) evict(sh *historyShard, st *memStream) {
	h.drop(sh, st)
	n := h.evicted.Add(1)
	now := h.now().UnixNano()
	last := h.loggedAt.Load()
	if now-last < int64(evictLogEvery) || !h.loggedAt.CompareAndSwap(last, now) {
		return
	}
	h.log.Warn("history store at its cap: least recently appended streams evicted, their next use starts a new epoch (clients holding positions are told their history is lost)",
		"evicted", n-h.logged.Swap(n), "evicted_total", n,
		"streams", h.count.Load(), "max_streams", h.caps.MaxStreams,
		"bytes", h.bytes.Load(), "max_bytes", h.caps.MaxTotalBytes)
}

// Evictions is how many streams were evicted to keep the store within its
// caps since it started.
func (h *History) Evictions() uint64 { return h.evicted.Load() }

// Size is how many streams the store holds and the bytes they count
// toward HistoryCaps.MaxTotalBytes.
func (h *History) Size() (streams, bytes int64) { return h.count.Load(), h.bytes.Load() }

// appended moves st to its shard's newest end.
func (sh *historyShard) appended(st *memStream) {
	if sh.newest == st {
		return
	}
	sh.unlink(st)
	st.older = sh.newest
	if sh.newest != nil {
		sh.newest.newer = st
	}
	sh.newest = st
	if sh.oldest == nil {
		sh.oldest = st
	}
}

func (sh *historyShard) pushOldest(st *memStream) {
	st.newer = sh.oldest
	if sh.oldest != nil {
		sh.oldest.older = st
	}
	sh.oldest = st
	if sh.newest == nil {
		sh.newest = st
	}
}

func (sh *historyShard) unlink(st *memStream) {
	if st.newer != nil {
		st.newer.older = st.older
	} else if sh.newest == st {
		sh.newest = st.older
	}
	if st.older != nil {
		st.older.newer = st.newer
	} else if sh.oldest == st {
		sh.oldest = st.newer
	}
	st.newer, st.older = nil, nil
}

// cost is what st counts toward MaxTotalBytes.
func (s *memStream) cost() int { return pipeline.StreamOverhead + len(s.name) + s.bytes }

func (s *memStream) expired(now time.Time) bool { return now.Sub(s.touched) >= s.life }

func (s *memStream) kept() int { return len(s.ents) - s.off }

// dropOldest forgets the oldest kept entry.
func (s *memStream) dropOldest() {
	s.bytes -= s.ents[s.off].size
	s.ents[s.off] = memEntry{} // let the body go
	s.off++
	// Compact when half the slice is dropped: amortised O(1) an entry.
	if s.off >= 32 && s.off*2 >= len(s.ents) {
		n := copy(s.ents, s.ents[s.off:])
		clear(s.ents[n:])
		s.ents, s.off = s.ents[:n], 0
	}
}

// trim drops the oldest entries beyond size, beyond maxBytes or older than
// the stream's TTL.
func (s *memStream) trim(now time.Time, size, maxBytes int) {
	for s.kept() > 0 {
		front := &s.ents[s.off]
		if s.kept() <= size && s.bytes <= maxBytes && (s.ttl <= 0 || now.Sub(front.stored) < s.ttl) {
			return
		}
		s.dropOldest()
	}
}

func (s *memStream) top(stream string) pipeline.StreamPos {
	return pipeline.StreamPos{Stream: stream, Epoch: s.epoch, Pos: s.seq}
}

// Append gives e the next position in each of streams (pipeline.History).
func (h *History) Append(_ context.Context, streams []string, e pipeline.HistoryEntry, limit func(stream string) pipeline.StreamLimit) ([]pipeline.StreamPos, error) {
	if err := pipeline.CheckHistoryStreams(streams); err != nil {
		return nil, fmt.Errorf("history append: %w", err)
	}
	// One copy of the entry for all its streams: the caller may reuse its
	// body.
	shared := &pipeline.HistoryEntry{ID: e.ID, Op: e.Op, Body: bytes.Clone(e.Body), At: e.At, Keys: slices.Clone(e.Keys)}
	size := len(shared.Body) + len(shared.ID) + pipeline.EntryKeysSize(shared.Keys) + pipeline.EntryOverhead
	out := make([]pipeline.StreamPos, len(streams))
	for i, name := range streams {
		l := limit(name) // outside the lock: it is the caller's code
		keep := min(max(l.Size, 0), h.caps.MaxSize)
		now := h.now()
		sh, st := h.lock(name, now, true)
		st.seq++
		st.ttl, st.touched, st.life = l.TTL, now, l.TTL
		if l.TTL <= 0 {
			st.life = h.caps.Idle
		}
		if size > h.caps.MaxBytes {
			// Kept alone it would break the cap; kept without those
			// before it, the history would have a hole. Keep none.
			keep = 0
		}
		if keep > 0 {
			st.ents = append(st.ents, memEntry{pos: st.seq, stored: now, e: shared, size: size})
			st.bytes += size
		}
		st.trim(now, keep, h.caps.MaxBytes)
		sh.appended(st)
		out[i] = st.top(name)
		h.unlock(sh, st)
	}
	return out, nil
}

// Since returns up to max entries of stream after position after
// (pipeline.History).
func (h *History) Since(_ context.Context, stream, epoch string, after uint64, max int) ([]pipeline.HistoryEntry, pipeline.StreamPos, error) {
	if err := pipeline.CheckStream(stream); err != nil {
		return nil, pipeline.StreamPos{}, fmt.Errorf("history since: %w", err)
	}
	if max <= 0 || max > pipeline.MaxHistorySince {
		max = pipeline.MaxHistorySince
	}
	now := h.now()
	sh, st := h.lock(stream, now, true)
	defer h.unlock(sh, st)
	st.trim(now, h.caps.MaxSize, h.caps.MaxBytes)
	top := st.top(stream)
	first := st.seq + 1 // the oldest kept position
	if st.kept() > 0 {
		first = st.ents[st.off].pos
	}
	switch {
	case epoch == "" && after == 0:
		after = first - 1
	case epoch != st.epoch:
		return nil, top, fmt.Errorf("history %s: epoch %q, now %q: %w", stream, epoch, st.epoch, pipeline.ErrEpochChanged)
	case after > st.seq:
		return nil, top, fmt.Errorf("history %s: position %d, top %d: %w", stream, after, st.seq, pipeline.ErrFuturePosition)
	case after == st.seq:
		return nil, top, nil
	case after+1 < first:
		return nil, top, fmt.Errorf("history %s: position %d, oldest kept %d: %w", stream, after, first, pipeline.ErrTrimmed)
	}
	from := st.off + int(after+1-first)
	n := min(len(st.ents)-from, max)
	if n <= 0 {
		return nil, top, nil
	}
	out := make([]pipeline.HistoryEntry, n)
	for i, me := range st.ents[from : from+n] {
		out[i] = *me.e
		out[i].Pos = me.pos
	}
	return out, top, nil
}

// Tops returns each stream's epoch and last position (pipeline.History).
func (h *History) Tops(_ context.Context, streams []string) ([]pipeline.StreamPos, error) {
	if err := pipeline.CheckHistoryStreams(streams); err != nil {
		return nil, fmt.Errorf("history tops: %w", err)
	}
	out := make([]pipeline.StreamPos, len(streams))
	for i, name := range streams {
		sh, st := h.lock(name, h.now(), true)
		out[i] = st.top(name)
		h.unlock(sh, st)
	}
	return out, nil
}

// Ack moves stream's acknowledged position forward to pos
// (pipeline.History).
func (h *History) Ack(_ context.Context, stream, epoch string, pos uint64) error {
	if err := pipeline.CheckStream(stream); err != nil {
		return fmt.Errorf("history ack: %w", err)
	}
	sh, st := h.lock(stream, h.now(), false)
	defer h.unlock(sh, st)
	switch {
	case st == nil || epoch != st.epoch:
		return fmt.Errorf("history ack %s: epoch %q: %w", stream, epoch, pipeline.ErrEpochChanged)
	case pos > st.seq:
		return fmt.Errorf("history ack %s: position %d, top %d: %w", stream, pos, st.seq, pipeline.ErrFuturePosition)
	}
	st.acked = max(st.acked, pos)
	return nil
}

// Acked returns stream's acknowledged position (pipeline.History).
func (h *History) Acked(_ context.Context, stream string) (pipeline.StreamPos, error) {
	if err := pipeline.CheckStream(stream); err != nil {
		return pipeline.StreamPos{}, fmt.Errorf("history acked: %w", err)
	}
	sh, st := h.lock(stream, h.now(), true)
	defer h.unlock(sh, st)
	return pipeline.StreamPos{Stream: stream, Epoch: st.epoch, Pos: st.acked}, nil
}

// Void marks the entries at positions as never accepted
// (pipeline.History): each kept one's body and keys are let go at once,
// its place in the stream stays.
func (h *History) Void(_ context.Context, positions []pipeline.StreamPos) error {
	if err := pipeline.CheckHistoryPositions(positions); err != nil {
		return fmt.Errorf("history void: %w", err)
	}
	for _, p := range positions {
		sh, st := h.lock(p.Stream, h.now(), false)
		if st != nil && st.epoch == p.Epoch {
			st.void(p.Pos)
		}
		h.unlock(sh, st) // counts the bytes let go in the store's total
	}
	return nil
}

// void replaces the kept entry at pos, if any, by a void one. The entry
// itself is shared with the other streams of its Append, which may still
// deliver it: only this stream's reference changes.
func (s *memStream) void(pos uint64) {
	if s.kept() == 0 || pos < s.ents[s.off].pos || pos > s.seq {
		return
	}
	i := s.off + int(pos-s.ents[s.off].pos) // kept entries have no hole
	if i >= len(s.ents) {
		return
	}
	me := &s.ents[i]
	if me.e.Void {
		return
	}
	me.e = &pipeline.HistoryEntry{ID: me.e.ID, At: me.e.At, Void: true}
	size := len(me.e.ID) + pipeline.EntryOverhead
	s.bytes -= me.size - size
	me.size = size
}

// streams is how many streams the store holds, for tests of the sweep.
func (h *History) streams() int {
	n := 0
	for i := range h.shards {
		sh := &h.shards[i]
		sh.mu.Lock()
		n += len(sh.streams)
		sh.mu.Unlock()
	}
	return n
}

// InProcess says the store answers from memory without blocking
// (pipeline.InProcess).
func (*History) InProcess() {}
