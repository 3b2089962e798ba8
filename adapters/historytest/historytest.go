// Package historytest is the contract every stream history
// (pipeline.History) passes: adapters/memory for one process,
// adapters/redis for a cluster.
package historytest

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"imcloud/pipeline"
	"imcloud/proto/wire"
)

// Factory returns an empty store with caps, and restart, which returns the
// store as it is after its state was lost: for memory a new store (a
// restarted process), for Redis the same keys deleted (flushed or expired).
type Factory func(t *testing.T, caps pipeline.HistoryCaps) (h pipeline.History, restart func() pipeline.History)

// testCaps are the caps the contract runs with unless a test says
// otherwise: a byte cap reached by ten bodies of 100 KiB, a size cap by
// 2,000 small entries.
func testCaps() pipeline.HistoryCaps {
	return pipeline.HistoryCaps{MaxSize: 2000, MaxBytes: 1 << 20, Idle: time.Hour}
}

// Run runs the contract against stores from newStore.
func Run(t *testing.T, newStore Factory) {
	open := func(t *testing.T) checked {
		h, _ := newStore(t, testCaps())
		return checked{t, h}
	}
	t.Run("positions", func(t *testing.T) { positions(t, open(t)) })
	t.Run("several streams", func(t *testing.T) { severalStreams(t, open(t)) })
	t.Run("concurrent appends", func(t *testing.T) { concurrent(t, open(t)) })
	t.Run("since", func(t *testing.T) { since(t, open(t)) })
	t.Run("since max", func(t *testing.T) { sinceMax(t, open(t)) })
	t.Run("size limit", func(t *testing.T) { sizeLimit(t, open(t)) })
	t.Run("size 0", func(t *testing.T) { sizeZero(t, open(t)) })
	t.Run("byte cap", func(t *testing.T) { byteCap(t, open(t)) })
	t.Run("ttl", func(t *testing.T) { ttl(t, open(t)) })
	t.Run("idle stream forgotten", func(t *testing.T) {
		for _, tt := range []struct {
			name  string
			limit pipeline.StreamLimit
			idle  time.Duration
		}{
			{"after its ttl", pipeline.StreamLimit{Size: 10, TTL: 300 * time.Millisecond}, time.Hour},
			{"ttl 0: after the store's idle", pipeline.StreamLimit{Size: 10}, 300 * time.Millisecond},
		} {
			t.Run(tt.name, func(t *testing.T) {
				caps := testCaps()
				caps.Idle = tt.idle
				h, _ := newStore(t, caps)
				idle(t, checked{t, h}, tt.limit)
			})
		}
	})
	t.Run("state lost", func(t *testing.T) {
		h, restart := newStore(t, testCaps())
		lost(t, checked{t, h}, restart)
	})
	t.Run("bad positions", func(t *testing.T) { badPositions(t, open(t)) })
	t.Run("tops", func(t *testing.T) { tops(t, open(t)) })
	t.Run("ack", func(t *testing.T) { ack(t, open(t)) })
	t.Run("abuse", func(t *testing.T) { abuse(t, open(t)) })
	t.Run("keys", func(t *testing.T) { keys(t, open(t)) })
	t.Run("void", func(t *testing.T) { void(t, open(t)) })
	t.Run("void passed over", func(t *testing.T) { voidPassedOver(t, open(t)) })
}

// keepAll keeps the last 1,000 entries of every stream for an hour.
func keepAll(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 1000, TTL: time.Hour} }

func limitOf(l pipeline.StreamLimit) func(string) pipeline.StreamLimit {
	return func(string) pipeline.StreamLimit { return l }
}

// checked wraps h so that an unexpected error fails the test.
type checked struct {
	t *testing.T
	h pipeline.History
}

func entry(i int) pipeline.HistoryEntry {
	return pipeline.HistoryEntry{
		ID:   fmt.Sprintf("msg-%d", i),
		Op:   int32(1000 + i),
		Body: fmt.Appendf(nil, "body %d", i),
		At:   time.Unix(1_700_000_000, int64(i)*1_000_003),
	}
}

func (c checked) append(streams []string, e pipeline.HistoryEntry, limit func(string) pipeline.StreamLimit) []pipeline.StreamPos {
	c.t.Helper()
	ps, err := c.h.Append(c.t.Context(), streams, e, limit)
	if err != nil {
		c.t.Fatalf("Append(%v): %v", streams, err)
	}
	if len(ps) != len(streams) {
		c.t.Fatalf("Append(%v) gave %d positions", streams, len(ps))
	}
	for i, p := range ps {
		if p.Stream != streams[i] || p.Epoch == "" || p.Pos == 0 {
			c.t.Fatalf("Append(%v)[%d] = %+v", streams, i, p)
		}
	}
	return ps
}

func (c checked) append1(stream string, i int, limit func(string) pipeline.StreamLimit) pipeline.StreamPos {
	c.t.Helper()
	return c.append([]string{stream}, entry(i), limit)[0]
}

func (c checked) since(stream, epoch string, after uint64, max int) ([]pipeline.HistoryEntry, pipeline.StreamPos) {
	c.t.Helper()
	es, top, err := c.h.Since(c.t.Context(), stream, epoch, after, max)
	if err != nil {
		c.t.Fatalf("Since(%s, %q, %d): %v", stream, epoch, after, err)
	}
	return es, top
}

// sinceErr asserts Since fails with want, returns no entries and the top.
func (c checked) sinceErr(stream, epoch string, after uint64, want error, top pipeline.StreamPos) {
	c.t.Helper()
	es, got, err := c.h.Since(c.t.Context(), stream, epoch, after, 0)
	if !errors.Is(err, want) {
		c.t.Fatalf("Since(%s, %q, %d) = %v, want %v", stream, epoch, after, err, want)
	}
	if len(es) != 0 {
		c.t.Fatalf("Since(%s, %q, %d) failed with %d entries", stream, epoch, after, len(es))
	}
	if got != top {
		c.t.Fatalf("Since(%s, %q, %d) top %+v, want %+v", stream, epoch, after, got, top)
	}
}

func (c checked) tops(streams ...string) []pipeline.StreamPos {
	c.t.Helper()
	ps, err := c.h.Tops(c.t.Context(), streams)
	if err != nil {
		c.t.Fatalf("Tops(%v): %v", streams, err)
	}
	if len(ps) != len(streams) {
		c.t.Fatalf("Tops(%v) gave %d", streams, len(ps))
	}
	for i, p := range ps {
		if p.Stream != streams[i] || p.Epoch == "" {
			c.t.Fatalf("Tops(%v)[%d] = %+v", streams, i, p)
		}
	}
	return ps
}

func (c checked) acked(stream string) pipeline.StreamPos {
	c.t.Helper()
	p, err := c.h.Acked(c.t.Context(), stream)
	if err != nil {
		c.t.Fatalf("Acked(%s): %v", stream, err)
	}
	if p.Stream != stream || p.Epoch == "" {
		c.t.Fatalf("Acked(%s) = %+v", stream, p)
	}
	return p
}

// positionsOf are the entries' positions, which must be contiguous.
func positionsOf(t *testing.T, es []pipeline.HistoryEntry) []uint64 {
	t.Helper()
	ps := make([]uint64, len(es))
	for i, e := range es {
		ps[i] = e.Pos
		if i > 0 && e.Pos != es[i-1].Pos+1 {
			t.Fatalf("entries not contiguous: %d after %d", e.Pos, es[i-1].Pos)
		}
	}
	return ps
}

func wantRange(t *testing.T, es []pipeline.HistoryEntry, from, to uint64) {
	t.Helper()
	ps := positionsOf(t, es)
	if from > to {
		if len(ps) != 0 {
			t.Fatalf("entries %v, want none", ps)
		}
		return
	}
	if len(ps) == 0 || ps[0] != from || ps[len(ps)-1] != to {
		t.Fatalf("entries %v, want %d..%d", ps, from, to)
	}
}

func positions(t *testing.T, c checked) {
	var epoch string
	for i := 1; i <= 5; i++ {
		p := c.append1("room:a://1", i, keepAll)
		if p.Pos != uint64(i) {
			t.Fatalf("append %d: position %d", i, p.Pos)
		}
		if i > 1 && p.Epoch != epoch {
			t.Fatalf("epoch changed from %q to %q without loss", epoch, p.Epoch)
		}
		epoch = p.Epoch
	}
	// Another stream counts on its own.
	if p := c.append1("user:1", 1, keepAll); p.Pos != 1 {
		t.Fatalf("a new stream starts at %d", p.Pos)
	}
	if p := c.append1("room:a://1", 6, keepAll); p.Pos != 6 {
		t.Fatalf("stream a after another's append: %d", p.Pos)
	}
}

func severalStreams(t *testing.T, c checked) {
	c.append1("user:1", 1, keepAll)
	c.append1("user:1", 2, keepAll)
	c.append1("user:2", 1, keepAll)
	streams := []string{"user:3", "user:1", "user:2"}
	ps := c.append(streams, entry(9), keepAll)
	for i, want := range []uint64{1, 3, 2} {
		if ps[i].Pos != want {
			t.Fatalf("%s at %d, want %d", streams[i], ps[i].Pos, want)
		}
	}
	// The entry is in each stream's history, at that stream's position.
	for _, p := range ps {
		es, _ := c.since(p.Stream, p.Epoch, p.Pos-1, 0)
		if len(es) != 1 || es[0].Pos != p.Pos || es[0].ID != "msg-9" {
			t.Fatalf("%s after %d: %+v", p.Stream, p.Pos-1, es)
		}
	}
	// Each limit is the stream's own: user:3 keeps none.
	ps = c.append(streams, entry(10), func(s string) pipeline.StreamLimit {
		if s == "user:3" {
			return pipeline.StreamLimit{}
		}
		return pipeline.StreamLimit{Size: 1000, TTL: time.Hour}
	})
	c.sinceErr("user:3", ps[0].Epoch, 1, pipeline.ErrTrimmed, ps[0])
	if es, _ := c.since("user:1", ps[1].Epoch, 0, 0); len(es) != 4 {
		t.Fatalf("user:1 keeps %d, want 4", len(es))
	}
	// A stream named twice in one call gets two positions.
	ps = c.append([]string{"user:9", "user:9"}, entry(11), keepAll)
	if ps[0].Pos != 1 || ps[1].Pos != 2 {
		t.Fatalf("user:9 twice: %+v", ps)
	}
}

// call is one Append as the goroutines saw it: the ticks of a shared
// counter just before it was called and just after it returned. The
// counter's atomic order agrees with happens-before.
type call struct {
	called, returned int64
	pos              uint64
}

func concurrent(t *testing.T, c checked) {
	ctx := t.Context()
	const goroutines, each = 8, 200
	var tick atomic.Int64
	calls := make([][]call, goroutines)
	var wg sync.WaitGroup
	errs := make(chan error, goroutines)
	for g := range goroutines {
		wg.Go(func() {
			own := fmt.Sprintf("user:%d", 100+g)
			for i := range each {
				called := tick.Add(1)
				ps, err := c.h.Append(ctx, []string{"room:shared://1", own}, entry(g*each+i), keepAll)
				returned := tick.Add(1)
				if err != nil {
					errs <- err
					return
				}
				if ps[1].Pos != uint64(i+1) {
					errs <- fmt.Errorf("%s: append %d at %d", own, i+1, ps[1].Pos)
					return
				}
				calls[g] = append(calls[g], call{called, returned, ps[0].Pos})
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	// Every position exactly once, no gap.
	byPos := make([]call, goroutines*each+1)
	for _, cs := range calls {
		for _, cl := range cs {
			if cl.pos == 0 || cl.pos > goroutines*each || byPos[cl.pos].pos != 0 {
				t.Fatalf("position %d given twice or out of 1..%d", cl.pos, goroutines*each)
			}
			byPos[cl.pos] = cl
		}
	}
	// An Append that returned before another was called has the lower
	// position: in position order, no earlier call may have been made
	// after a later one returned.
	var maxCalled int64
	for p := 1; p < len(byPos); p++ {
		if maxCalled > byPos[p].returned {
			t.Fatalf("position %d returned before an append that got a lower position was called", p)
		}
		maxCalled = max(maxCalled, byPos[p].called)
	}
	es, top := c.since("room:shared://1", "", 0, 0)
	if top.Pos != goroutines*each {
		t.Fatalf("top %d, want %d", top.Pos, goroutines*each)
	}
	// keepAll keeps the last 1,000, all that one Since returns.
	wantRange(t, es, goroutines*each-999, goroutines*each)
}

func since(t *testing.T, c checked) {
	ctx := t.Context()
	const s = "room:since://1"
	var top pipeline.StreamPos
	for i := 1; i <= 5; i++ {
		top = c.append1(s, i, keepAll)
	}
	es, got := c.since(s, "", 0, 0)
	if got != top {
		t.Fatalf("top %+v, want %+v", got, top)
	}
	wantRange(t, es, 1, 5)
	for _, e := range es {
		want := entry(int(e.Pos))
		if e.ID != want.ID || e.Op != want.Op || !bytes.Equal(e.Body, want.Body) || !e.At.Equal(want.At) {
			t.Fatalf("entry %d = %+v, want %+v", e.Pos, e, want)
		}
	}
	for _, tt := range []struct {
		after    uint64
		max      int
		from, to uint64
	}{
		{0, 0, 1, 5},
		{2, 0, 3, 5},
		{2, 2, 3, 4},
		{4, 100, 5, 5},
		{5, 0, 1, 0}, // at the top: nothing, no error
	} {
		es, got := c.since(s, top.Epoch, tt.after, tt.max)
		if got != top {
			t.Fatalf("after %d: top %+v, want %+v", tt.after, got, top)
		}
		wantRange(t, es, tt.from, tt.to)
	}
	// The store keeps its own copy of the body.
	e := entry(6)
	p, err := c.h.Append(ctx, []string{s}, e, keepAll)
	if err != nil {
		t.Fatal(err)
	}
	copy(e.Body, "XXXX")
	es, _ = c.since(s, p[0].Epoch, 5, 0)
	if len(es) != 1 || string(es[0].Body) != "body 6" {
		t.Fatalf("body changed by its caller after Append: %+v", es)
	}
}

func sinceMax(t *testing.T, c checked) {
	const s = "room:max://1"
	n := pipeline.MaxHistorySince + 5
	var top pipeline.StreamPos
	for i := 1; i <= n; i++ {
		top = c.append1(s, i, limitOf(pipeline.StreamLimit{Size: n, TTL: time.Hour}))
	}
	for _, max := range []int{0, -1, n, 1 << 30} {
		es, _ := c.since(s, top.Epoch, 0, max)
		wantRange(t, es, 1, pipeline.MaxHistorySince)
	}
	es, _ := c.since(s, top.Epoch, pipeline.MaxHistorySince, 0)
	wantRange(t, es, pipeline.MaxHistorySince+1, uint64(n))
}

func sizeLimit(t *testing.T, c checked) {
	const s = "room:size://1"
	three := limitOf(pipeline.StreamLimit{Size: 3, TTL: time.Hour})
	var top pipeline.StreamPos
	for i := 1; i <= 10; i++ {
		top = c.append1(s, i, three)
	}
	es, _ := c.since(s, "", 0, 0)
	wantRange(t, es, 8, 10)
	es, _ = c.since(s, top.Epoch, 7, 0)
	wantRange(t, es, 8, 10)
	c.sinceErr(s, top.Epoch, 6, pipeline.ErrTrimmed, top)
	c.sinceErr(s, top.Epoch, 0, pipeline.ErrTrimmed, top)
	// A smaller limit trims at once.
	top = c.append1(s, 11, limitOf(pipeline.StreamLimit{Size: 1, TTL: time.Hour}))
	es, _ = c.since(s, "", 0, 0)
	wantRange(t, es, 11, 11)
	// The store's cap bounds a limit above it.
	caps := testCaps()
	for i := 12; i <= caps.MaxSize+20; i++ {
		top = c.append1(s, i, limitOf(pipeline.StreamLimit{Size: 1 << 30, TTL: time.Hour}))
	}
	es, _ = c.since(s, top.Epoch, top.Pos-uint64(caps.MaxSize), 0)
	wantRange(t, es, top.Pos-uint64(caps.MaxSize)+1, top.Pos-uint64(caps.MaxSize)+pipeline.MaxHistorySince)
	c.sinceErr(s, top.Epoch, top.Pos-uint64(caps.MaxSize)-1, pipeline.ErrTrimmed, top)
}

func sizeZero(t *testing.T, c checked) {
	const s = "room:zero://1"
	none := limitOf(pipeline.StreamLimit{TTL: time.Hour})
	var top pipeline.StreamPos
	for i := 1; i <= 5; i++ {
		top = c.append1(s, i, none)
		if top.Pos != uint64(i) {
			t.Fatalf("size 0: append %d at %d", i, top.Pos)
		}
	}
	for _, after := range []uint64{0, 1, 4} {
		c.sinceErr(s, top.Epoch, after, pipeline.ErrTrimmed, top)
	}
	if es, got := c.since(s, top.Epoch, 5, 0); len(es) != 0 || got != top {
		t.Fatalf("at the top: %d entries, top %+v", len(es), got)
	}
	if es, got := c.since(s, "", 0, 0); len(es) != 0 || got != top {
		t.Fatalf("everything kept: %d entries, top %+v", len(es), got)
	}
}

func byteCap(t *testing.T, c checked) {
	const s = "room:bytes://1"
	body := bytes.Repeat([]byte("b"), 100<<10)
	var top pipeline.StreamPos
	for i := range 20 {
		e := entry(i)
		e.Body = body
		top = c.append([]string{s}, e, keepAll)[0]
	}
	es, _ := c.since(s, "", 0, 0)
	// 1 MiB holds ten entries of 100 KiB and their overhead.
	if len(es) < 9 || len(es) > 10 || es[len(es)-1].Pos != top.Pos {
		t.Fatalf("1 MiB of 100 KiB entries keeps %v", positionsOf(t, es))
	}
	positionsOf(t, es)
	// An entry above the cap gets its position but is not kept, nor is
	// any before it (a history has no hole); the next one is kept.
	huge := entry(100)
	huge.Body = bytes.Repeat([]byte("h"), 4<<20)
	hp := c.append([]string{s}, huge, keepAll)[0]
	if hp.Pos != top.Pos+1 {
		t.Fatalf("huge entry at %d, want %d", hp.Pos, top.Pos+1)
	}
	c.sinceErr(s, hp.Epoch, hp.Pos-1, pipeline.ErrTrimmed, hp)
	if es, _ := c.since(s, "", 0, 0); len(es) != 0 {
		t.Fatalf("after a huge entry %v are kept", positionsOf(t, es))
	}
	next := c.append1(s, 101, keepAll)
	es, _ = c.since(s, next.Epoch, hp.Pos, 0)
	wantRange(t, es, next.Pos, next.Pos)
}

// waitFor polls cond every 20 ms until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func ttl(t *testing.T, c checked) {
	ctx := t.Context()
	const s = "room:ttl://1"
	const life = 300 * time.Millisecond
	short := limitOf(pipeline.StreamLimit{Size: 100, TTL: life})
	// Taken before the append: the store ages the entry from its own
	// append time, which is after this (once, after it, a drop 50 µs
	// short of the ttl failed the check below).
	start := time.Now()
	first := c.append1(s, 1, short)
	// Appends keep the stream alive; the first entry ages out of it.
	i := 2
	waitFor(t, 20*life, "first entry dropped", func() bool {
		c.append1(s, i, short)
		i++
		_, _, err := c.h.Since(ctx, s, first.Epoch, 0, 0)
		return errors.Is(err, pipeline.ErrTrimmed)
	})
	// Stores keep times in milliseconds (Redis' TIME, truncated): an
	// entry may go up to 1 ms early.
	if time.Since(start) < life-time.Millisecond {
		t.Fatalf("entry dropped after %s, before its ttl of %s", time.Since(start), life)
	}
	es, top := c.since(s, "", 0, 0)
	if top.Epoch != first.Epoch {
		t.Fatal("a stream appended to within its ttl changed its epoch")
	}
	if len(es) == 0 || es[0].Pos == 1 || es[len(es)-1].Pos != top.Pos {
		t.Fatalf("kept %v of 1..%d", positionsOf(t, es), top.Pos)
	}
	positionsOf(t, es)
	// Without appends the rest ages out too: Since drops them itself.
	last := top
	waitFor(t, 20*life, "entries older than the ttl dropped", func() bool {
		es, top, err := c.h.Since(ctx, s, "", 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		if top.Epoch == last.Epoch && top.Pos != last.Pos {
			t.Fatalf("top moved to %+v without appends", top)
		}
		return len(es) == 0
	})
}

func idle(t *testing.T, c checked, limit pipeline.StreamLimit) {
	ctx := t.Context()
	const s = "user:42"
	c.append1(s, 1, limitOf(limit))
	old := c.append1(s, 2, limitOf(limit))
	if err := c.h.Ack(ctx, s, old.Epoch, 1); err != nil {
		t.Fatal(err)
	}
	var now pipeline.StreamPos
	waitFor(t, 10*time.Second, "idle stream forgotten", func() bool {
		now = c.tops(s)[0]
		return now.Epoch != old.Epoch
	})
	if now.Pos != 0 {
		t.Fatalf("forgotten stream's top %+v", now)
	}
	c.sinceErr(s, old.Epoch, 1, pipeline.ErrEpochChanged, now)
	if a := c.acked(s); a.Pos != 0 || a.Epoch != now.Epoch {
		t.Fatalf("forgotten stream's ack %+v, top %+v", a, now)
	}
	if p := c.append1(s, 3, limitOf(limit)); p.Pos != 1 || p.Epoch != now.Epoch {
		t.Fatalf("first append after the loss %+v, want 1 in %q", p, now.Epoch)
	}
}

func lost(t *testing.T, c checked, restart func() pipeline.History) {
	ctx := t.Context()
	const s = "room:lost://1"
	for i := 1; i <= 3; i++ {
		c.append1(s, i, keepAll)
	}
	old := c.append1("user:7", 1, keepAll)
	c.h = restart()
	tops := c.tops(s, "user:7")
	for i, p := range tops {
		if p.Pos != 0 || p.Epoch == old.Epoch {
			t.Fatalf("after the loss Tops[%d] = %+v (old epoch %q)", i, p, old.Epoch)
		}
	}
	c.sinceErr("user:7", old.Epoch, 1, pipeline.ErrEpochChanged, tops[1])
	if err := c.h.Ack(ctx, "user:7", old.Epoch, 1); !errors.Is(err, pipeline.ErrEpochChanged) {
		t.Fatalf("ack in the old epoch: %v", err)
	}
	if p := c.append1(s, 4, keepAll); p.Pos != 1 || p.Epoch != tops[0].Epoch {
		t.Fatalf("first append after the loss %+v, want 1 in %q", p, tops[0].Epoch)
	}
}

func badPositions(t *testing.T, c checked) {
	const s = "room:bad://1"
	var top pipeline.StreamPos
	for i := 1; i <= 3; i++ {
		top = c.append1(s, i, keepAll)
	}
	c.sinceErr(s, "not-the-epoch", 1, pipeline.ErrEpochChanged, top)
	c.sinceErr(s, "not-the-epoch", 0, pipeline.ErrEpochChanged, top)
	c.sinceErr(s, "", 1, pipeline.ErrEpochChanged, top)
	c.sinceErr(s, top.Epoch, 4, pipeline.ErrFuturePosition, top)
	c.sinceErr(s, top.Epoch, 1<<63, pipeline.ErrFuturePosition, top)
	// A stream never seen: any position is of another epoch; everything
	// kept is nothing.
	es, nt := c.since("room:never://1", "", 0, 0)
	if len(es) != 0 || nt.Pos != 0 || nt.Epoch == "" {
		t.Fatalf("never seen stream: %d entries, top %+v", len(es), nt)
	}
	c.sinceErr("room:never://1", top.Epoch, 1, pipeline.ErrEpochChanged, nt)
}

func tops(t *testing.T, c checked) {
	c.append1("room:t://a", 1, keepAll)
	a := c.append1("room:t://a", 2, keepAll)
	got := c.tops("room:t://a", "room:t://never", "user:5")
	if got[0] != a {
		t.Fatalf("Tops of a stream at %+v: %+v", a, got[0])
	}
	for _, p := range got[1:] {
		if p.Pos != 0 {
			t.Fatalf("never seen stream at %+v", p)
		}
	}
	// A never seen stream keeps the epoch Tops gave it.
	again := c.tops("room:t://never")
	if again[0] != got[1] {
		t.Fatalf("Tops again %+v, first %+v", again[0], got[1])
	}
	if p := c.append1("room:t://never", 1, keepAll); p.Pos != 1 || p.Epoch != got[1].Epoch {
		t.Fatalf("first append %+v, Tops said %+v", p, got[1])
	}
	if ps := c.tops(); len(ps) != 0 {
		t.Fatalf("Tops of none: %v", ps)
	}
}

func ack(t *testing.T, c checked) {
	ctx := t.Context()
	const s = "user:11"
	var top pipeline.StreamPos
	for i := 1; i <= 5; i++ {
		top = c.append1(s, i, keepAll)
	}
	if a := c.acked(s); a.Pos != 0 || a.Epoch != top.Epoch {
		t.Fatalf("never acked: %+v", a)
	}
	for _, tt := range []struct {
		name string
		pos  uint64
		want uint64
	}{
		{"forward", 2, 2},
		{"back is a no-op", 1, 2},
		{"same is a no-op", 2, 2},
		{"zero is a no-op", 0, 2},
		{"to the top", 5, 5},
	} {
		if err := c.h.Ack(ctx, s, top.Epoch, tt.pos); err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		if a := c.acked(s); a.Pos != tt.want || a.Epoch != top.Epoch {
			t.Fatalf("%s: acked %+v, want %d", tt.name, a, tt.want)
		}
	}
	for _, tt := range []struct {
		name, stream, epoch string
		pos                 uint64
		want                error
	}{
		{"past the top", s, top.Epoch, 6, pipeline.ErrFuturePosition},
		{"far past the top", s, top.Epoch, 1 << 63, pipeline.ErrFuturePosition},
		{"foreign epoch", s, "other", 1, pipeline.ErrEpochChanged},
		{"no epoch", s, "", 1, pipeline.ErrEpochChanged},
		{"never seen stream", "user:404", top.Epoch, 1, pipeline.ErrEpochChanged},
	} {
		if err := c.h.Ack(ctx, tt.stream, tt.epoch, tt.pos); !errors.Is(err, tt.want) {
			t.Fatalf("%s: %v, want %v", tt.name, err, tt.want)
		}
	}
	if a := c.acked(s); a.Pos != 5 {
		t.Fatalf("refused acks moved the cursor to %+v", a)
	}
	// Trimming does not touch the cursor.
	for i := 6; i <= 10; i++ {
		c.append1(s, i, limitOf(pipeline.StreamLimit{Size: 1, TTL: time.Hour}))
	}
	if a := c.acked(s); a.Pos != 5 {
		t.Fatalf("after trimming acked %+v", a)
	}
}

func abuse(t *testing.T, c checked) {
	ctx := t.Context()
	long := "room:" + strings.Repeat("x", 10<<10)
	many := make([]string, pipeline.MaxHistoryStreams+1)
	for i := range many {
		many[i] = fmt.Sprintf("user:%d", 1_000_000+i)
	}
	refused := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, pipeline.ErrHistoryRequest) {
			t.Fatalf("%s: %v, want ErrHistoryRequest", what, err)
		}
	}
	for _, tt := range []struct {
		name    string
		streams []string
	}{
		{"too many streams", many},
		{"a 10 KB name", []string{"user:1", long}},
		{"an empty name", []string{""}},
	} {
		_, err := c.h.Append(ctx, tt.streams, entry(1), keepAll)
		refused("Append "+tt.name, err)
		_, err = c.h.Tops(ctx, tt.streams)
		refused("Tops "+tt.name, err)
	}
	// Nothing of a refused call was appended.
	if p := c.tops(many[0], "user:1"); p[0].Pos != 0 || p[1].Pos != 0 {
		t.Fatalf("a refused Append appended: %+v", p)
	}
	_, _, err := c.h.Since(ctx, long, "", 0, 0)
	refused("Since", err)
	refused("Ack", c.h.Ack(ctx, long, "e", 1))
	_, err = c.h.Acked(ctx, long)
	refused("Acked", err)
	// At the bounds: MaxHistoryStreams streams, and the longest room.
	ps := c.append(many[:pipeline.MaxHistoryStreams], entry(2), keepAll)
	if ps[len(ps)-1].Pos != 1 {
		t.Fatalf("last of %d streams at %+v", len(ps), ps[len(ps)-1])
	}
	room := "t://" + strings.Repeat("r", wire.MaxRoomLen-len("t://"))
	if err := wire.ValidRoom(room); err != nil {
		t.Fatal(err)
	}
	if s := pipeline.RoomStream(room); len(s) != pipeline.MaxStreamLen {
		t.Fatalf("MaxStreamLen %d, the longest room's stream %d", pipeline.MaxStreamLen, len(s))
	}
	c.append1(pipeline.RoomStream(room), 1, keepAll)
}

// keys: a key push's keys come back with its entry, in every stream it
// went to; an entry without keys has none.
func keys(t *testing.T, c checked) {
	streams := []string{"user:21", "user:22"}
	plain := c.append(streams, entry(1), keepAll)
	e := entry(2)
	e.Keys = []string{"key-a", "key-b", strings.Repeat("k", wire.MaxKeyLen)}
	keyed := c.append(streams, e, keepAll)
	e.Keys[0] = "changed by the caller"
	for i, s := range streams {
		es, _ := c.since(s, keyed[i].Epoch, plain[i].Pos-1, 0)
		wantRange(t, es, plain[i].Pos, keyed[i].Pos)
		if len(es[0].Keys) != 0 {
			t.Fatalf("%s: an entry without keys has %q", s, es[0].Keys)
		}
		want := []string{"key-a", "key-b", strings.Repeat("k", wire.MaxKeyLen)}
		if !slices.Equal(es[1].Keys, want) {
			t.Fatalf("%s: keys %q, want %q", s, es[1].Keys, want)
		}
		if es[1].ID != "msg-2" || string(es[1].Body) != "body 2" || es[1].Void {
			t.Fatalf("%s: keyed entry %+v", s, es[1])
		}
	}
}

// void: a voided position keeps its place, its body and keys are gone,
// Since marks it; the same entry in another stream is untouched.
func void(t *testing.T, c checked) {
	ctx := t.Context()
	const s, other = "user:31", "room:void://1"
	var ps []pipeline.StreamPos
	for i := 1; i <= 5; i++ {
		e := entry(i)
		e.Keys = []string{fmt.Sprintf("key-%d", i)}
		ps = append(ps, c.append([]string{s, other}, e, keepAll)[0])
	}
	top := ps[4]
	voided := []pipeline.StreamPos{ps[1], ps[3]} // 2 and 4
	if err := c.h.Void(ctx, voided); err != nil {
		t.Fatalf("Void: %v", err)
	}
	// Twice is a no-op.
	if err := c.h.Void(ctx, voided); err != nil {
		t.Fatalf("Void again: %v", err)
	}
	es, got := c.since(s, top.Epoch, 0, 0)
	if got != top {
		t.Fatalf("top %+v after Void, want %+v", got, top)
	}
	wantRange(t, es, 1, 5)
	for _, e := range es {
		want := entry(int(e.Pos))
		isVoid := e.Pos == 2 || e.Pos == 4
		switch {
		case e.Void != isVoid:
			t.Fatalf("entry %d: void %v, want %v", e.Pos, e.Void, isVoid)
		case isVoid && (len(e.Body) != 0 || len(e.Keys) != 0 || e.Op != 0 || e.ID != want.ID):
			t.Fatalf("void entry %d: %+v, want its id and no body, op or keys", e.Pos, e)
		case !isVoid && (!bytes.Equal(e.Body, want.Body) || e.Op != want.Op || len(e.Keys) != 1):
			t.Fatalf("entry %d changed by voiding others: %+v", e.Pos, e)
		}
	}
	// The other stream of the same Appends keeps its entries whole.
	es, _ = c.since(other, "", 0, 0)
	wantRange(t, es, 1, 5)
	for _, e := range es {
		if e.Void || string(e.Body) != fmt.Sprintf("body %d", e.Pos) {
			t.Fatalf("%s entry %d changed by voiding %s: %+v", other, e.Pos, s, e)
		}
	}
	// Positions go on after the voided ones; an epoch-less read of
	// everything kept marks them too.
	if p := c.append1(s, 6, keepAll); p.Pos != 6 || p.Epoch != top.Epoch {
		t.Fatalf("append after Void at %+v", p)
	}
	es, _ = c.since(s, "", 0, 0)
	if len(es) != 6 || !es[1].Void || !es[3].Void || es[5].Void {
		t.Fatalf("everything kept after Void: %+v", es)
	}
	// Voided entries are trimmed like the others: the history still has
	// no hole.
	three := limitOf(pipeline.StreamLimit{Size: 3, TTL: time.Hour})
	last := c.append1(s, 7, three) // keeps 5..7
	if err := c.h.Void(ctx, []pipeline.StreamPos{{Stream: s, Epoch: top.Epoch, Pos: 6}}); err != nil {
		t.Fatal(err)
	}
	es, _ = c.since(s, top.Epoch, 4, 0)
	wantRange(t, es, 5, 7)
	if es[0].Void || !es[1].Void || es[2].Void {
		t.Fatalf("after trimming, void marks %v %v %v, want false true false", es[0].Void, es[1].Void, es[2].Void)
	}
	c.sinceErr(s, top.Epoch, 3, pipeline.ErrTrimmed, last)
}

// voidPassedOver: positions Void cannot find — another epoch, never
// given, no longer kept, in a stream that keeps none or never was — are
// passed over without an error and change nothing; a refused call
// voids nothing.
func voidPassedOver(t *testing.T, c checked) {
	ctx := t.Context()
	const s, zero = "user:41", "user:42"
	var top pipeline.StreamPos
	for i := 1; i <= 3; i++ {
		top = c.append1(s, i, limitOf(pipeline.StreamLimit{Size: 2, TTL: time.Hour})) // keeps 2..3
	}
	z := c.append1(zero, 1, limitOf(pipeline.StreamLimit{TTL: time.Hour}))
	err := c.h.Void(ctx, []pipeline.StreamPos{
		{Stream: s, Epoch: "other", Pos: 2},
		{Stream: s, Epoch: top.Epoch, Pos: 1}, // trimmed
		{Stream: s, Epoch: top.Epoch, Pos: 4}, // not given yet
		{Stream: s, Epoch: top.Epoch, Pos: 1 << 63},
		{Stream: s, Epoch: top.Epoch, Pos: 0},
		z, // size 0: not kept
		{Stream: "user:404", Epoch: top.Epoch, Pos: 1},
	})
	if err != nil {
		t.Fatalf("Void of positions not kept: %v", err)
	}
	es, got := c.since(s, top.Epoch, 1, 0)
	wantRange(t, es, 2, 3)
	if got != top || es[0].Void || es[1].Void {
		t.Fatalf("after passed-over voids: top %+v, entries %+v", got, es)
	}
	if p := c.append1(s, 4, keepAll); p.Pos != 4 {
		t.Fatalf("a void of a position not given yet took it: next append at %d", p.Pos)
	}
	if es, _ := c.since(s, top.Epoch, 3, 0); len(es) != 1 || es[0].Void {
		t.Fatalf("position 4, voided before it was given: %+v", es)
	}
	if p := c.tops("user:404")[0]; p.Pos != 0 {
		t.Fatalf("Void of a stream never seen appended: %+v", p)
	}
	// Refused: too many positions, a stream name too long; nothing voided.
	many := make([]pipeline.StreamPos, pipeline.MaxHistoryStreams+1)
	for i := range many {
		many[i] = pipeline.StreamPos{Stream: s, Epoch: top.Epoch, Pos: 2}
	}
	long := pipeline.StreamPos{Stream: "room:" + strings.Repeat("x", 10<<10), Epoch: top.Epoch, Pos: 1}
	for name, ps := range map[string][]pipeline.StreamPos{
		"too many positions": many,
		"a 10 KB name":       {{Stream: s, Epoch: top.Epoch, Pos: 3}, long},
		"an empty name":      {{Stream: s, Epoch: top.Epoch, Pos: 3}, {Epoch: top.Epoch, Pos: 1}},
	} {
		if err := c.h.Void(ctx, ps); !errors.Is(err, pipeline.ErrHistoryRequest) {
			t.Fatalf("Void of %s: %v, want ErrHistoryRequest", name, err)
		}
	}
	if es, _ := c.since(s, top.Epoch, 1, 0); es[0].Void || es[1].Void {
		t.Fatalf("a refused Void voided: %+v", es)
	}
}
