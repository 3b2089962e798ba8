package nodecache

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"imcloud/proto/pb"
)

// source counts its fetches; each returns the nodes set at that time, or
// err. gate, when set, blocks every fetch until it is closed.
type source struct {
	mu    sync.Mutex
	ids   []string
	err   error
	gate  chan struct{}
	calls atomic.Int32
}

func (s *source) Nodes(ctx context.Context) ([]*pb.NodeInfo, error) {
	s.calls.Add(1)
	s.mu.Lock()
	gate, ids, err := s.gate, s.ids, s.err
	s.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if err != nil {
		return nil, err
	}
	out := make([]*pb.NodeInfo, len(ids))
	for i, id := range ids {
		out[i] = &pb.NodeInfo{Id: id}
	}
	return out, nil
}

func (s *source) set(ids []string, err error) {
	s.mu.Lock()
	s.ids, s.err = ids, err
	s.mu.Unlock()
}

// clock is a settable clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func ids(ns []*pb.NodeInfo) []string {
	out := make([]string, len(ns))
	for i, n := range ns {
		out[i] = n.Id
	}
	return out
}

func TestExpiry(t *testing.T) {
	src := &source{ids: []string{"a"}}
	clk := &clock{t: time.Unix(1000, 0)}
	c := New(src, time.Second, clk.now)
	ctx := context.Background()
	steps := []struct {
		name      string
		advance   time.Duration
		change    []string
		wantIDs   []string
		wantCalls int32
	}{
		{"first call fetches", 0, nil, []string{"a"}, 1},
		{"within the TTL: kept, a change unseen", 999 * time.Millisecond, []string{"a", "b"}, []string{"a"}, 1},
		{"at the TTL: fetched again", time.Millisecond, nil, []string{"a", "b"}, 2},
		{"kept again", 500 * time.Millisecond, []string{"b"}, []string{"a", "b"}, 2},
		{"expired again", time.Second, nil, []string{"b"}, 3},
	}
	for _, st := range steps {
		clk.add(st.advance)
		if st.change != nil {
			src.set(st.change, nil)
		}
		got, err := c.Nodes(ctx)
		if err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		if g := ids(got); !equal(g, st.wantIDs) {
			t.Errorf("%s: nodes %v, want %v", st.name, g, st.wantIDs)
		}
		if n := src.calls.Load(); n != st.wantCalls {
			t.Errorf("%s: %d fetches, want %d", st.name, n, st.wantCalls)
		}
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// A burst of callers after expiry makes one fetch, and all get its list.
func TestConcurrentCallersOneFetch(t *testing.T) {
	gate := make(chan struct{})
	src := &source{ids: []string{"a", "b"}, gate: gate}
	c := New(src, time.Minute, nil)
	const callers = 64
	var wg sync.WaitGroup
	results := make([][]string, callers)
	errs := make([]error, callers)
	for i := range callers {
		wg.Go(func() {
			ns, err := c.Nodes(context.Background())
			results[i], errs[i] = ids(ns), err
		})
	}
	// Every caller is started before the one fetch may finish: wait until
	// the fetch is running, then let it go.
	deadline := time.Now().Add(5 * time.Second)
	for src.calls.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no fetch started")
		}
		time.Sleep(time.Millisecond)
	}
	close(gate)
	wg.Wait()
	if n := src.calls.Load(); n != 1 {
		t.Errorf("%d fetches for %d concurrent callers, want 1", n, callers)
	}
	for i := range callers {
		if errs[i] != nil || !equal(results[i], []string{"a", "b"}) {
			t.Fatalf("caller %d: %v, %v", i, results[i], errs[i])
		}
	}
}

// A failed fetch reaches its callers and is not kept: the next call
// fetches again.
func TestErrorsNotCached(t *testing.T) {
	boom := errors.New("redis down")
	src := &source{err: boom}
	c := New(src, time.Minute, nil)
	ctx := context.Background()
	if _, err := c.Nodes(ctx); !errors.Is(err, boom) {
		t.Fatalf("first call: %v, want %v", err, boom)
	}
	if _, err := c.Nodes(ctx); !errors.Is(err, boom) {
		t.Fatalf("second call: %v, want %v", err, boom)
	}
	if n := src.calls.Load(); n != 2 {
		t.Fatalf("%d fetches, want 2 (errors are not kept)", n)
	}
	src.set([]string{"a"}, nil)
	got, err := c.Nodes(ctx)
	if err != nil || !equal(ids(got), []string{"a"}) {
		t.Fatalf("after recovery: %v, %v", ids(got), err)
	}
	// A later failure does not replace the kept list within the TTL.
	src.set(nil, boom)
	if got, err := c.Nodes(ctx); err != nil || !equal(ids(got), []string{"a"}) {
		t.Fatalf("kept list: %v, %v", ids(got), err)
	}
	if n := src.calls.Load(); n != 3 {
		t.Fatalf("%d fetches, want 3", n)
	}
}

// A caller that gives up does not fail the fetch others wait on.
func TestCallerCancelDoesNotFailOthers(t *testing.T) {
	gate := make(chan struct{})
	src := &source{ids: []string{"a"}, gate: gate}
	c := New(src, time.Minute, nil)
	ctx, cancel := context.WithCancel(context.Background())
	first := make(chan error, 1)
	go func() { _, err := c.Nodes(ctx); first <- err }()
	deadline := time.Now().Add(5 * time.Second)
	for src.calls.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no fetch started")
		}
		time.Sleep(time.Millisecond)
	}
	second := make(chan []string, 1)
	go func() { ns, _ := c.Nodes(context.Background()); second <- ids(ns) }()
	cancel()
	if err := <-first; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled caller: %v", err)
	}
	close(gate)
	if got := <-second; !equal(got, []string{"a"}) {
		t.Fatalf("other caller: %v", got)
	}
	if n := src.calls.Load(); n != 1 {
		t.Fatalf("%d fetches, want 1", n)
	}
}

// NodesWith reads the list again for an id the kept list lacks.
func TestNodesWithMissRefetches(t *testing.T) {
	src := &source{ids: []string{"a"}}
	clk := &clock{t: time.Unix(1000, 0)}
	c := New(src, time.Second, clk.now)
	ctx := context.Background()
	steps := []struct {
		name      string
		change    []string
		want      []string
		wantIDs   []string
		wantCalls int32
	}{
		{"first call fetches", nil, []string{"a"}, []string{"a"}, 1},
		{"known id: kept", []string{"a", "b"}, []string{"a"}, []string{"a"}, 1},
		{"unknown id: fetched", nil, []string{"b"}, []string{"a", "b"}, 2},
		{"now known: kept", nil, []string{"a", "b"}, []string{"a", "b"}, 2},
		{"id of a lapsed node: fetched each time", nil, []string{"gone"}, []string{"a", "b"}, 3},
		{"and again", nil, []string{"gone"}, []string{"a", "b"}, 4},
	}
	for _, st := range steps {
		clk.add(10 * time.Millisecond)
		if st.change != nil {
			src.set(st.change, nil)
		}
		got, err := c.NodesWith(ctx, st.want)
		if err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		if g := ids(got); !equal(g, st.wantIDs) {
			t.Errorf("%s: nodes %v, want %v", st.name, g, st.wantIDs)
		}
		if n := src.calls.Load(); n != st.wantCalls {
			t.Errorf("%s: %d fetches, want %d", st.name, n, st.wantCalls)
		}
	}
}

// Concurrent callers missing an id share one fetch.
func TestNodesWithMissBurstOneFetch(t *testing.T) {
	src := &source{ids: []string{"a"}}
	c := New(src, time.Minute, nil)
	ctx := context.Background()
	if _, err := c.Nodes(ctx); err != nil {
		t.Fatal(err)
	}
	gate := make(chan struct{})
	src.mu.Lock()
	src.ids, src.gate = []string{"a", "new"}, gate
	src.mu.Unlock()
	const callers = 32
	var wg sync.WaitGroup
	results := make([][]string, callers)
	for i := range callers {
		wg.Go(func() {
			ns, err := c.NodesWith(ctx, []string{"new"})
			if err != nil {
				t.Error(err)
			}
			results[i] = ids(ns)
		})
	}
	deadline := time.Now().Add(5 * time.Second)
	for src.calls.Load() < 2 {
		if time.Now().After(deadline) {
			t.Fatal("no refetch started")
		}
		time.Sleep(time.Millisecond)
	}
	close(gate)
	wg.Wait()
	// Callers that asked after the refetch ended may have started
	// another: at most a few, never one each.
	if n := src.calls.Load() - 1; n < 1 || n > callers/4 {
		t.Errorf("%d refetches for %d concurrent callers", n, callers)
	}
	for i, r := range results {
		if !equal(r, []string{"a", "new"}) {
			t.Fatalf("caller %d: %v", i, r)
		}
	}
}

// versioned is a source with a version that moves when its list does.
type versioned struct {
	source
	ver      atomic.Uint64
	verCalls atomic.Int32
}

func (v *versioned) NodesVersion(context.Context) (uint64, error) {
	v.verCalls.Add(1)
	return v.ver.Load(), nil
}

// report changes the list and its version, as a node report does.
func (v *versioned) report(ids []string) {
	v.set(ids, nil)
	v.ver.Add(1)
}

// TestNodesSince: a list asked for as of a time is read, or confirmed by
// its version, after that time — never the kept one alone when it is
// older, however young for the TTL — and the version spares reading the
// list when nothing changed.
func TestNodesSince(t *testing.T) {
	src := &versioned{}
	src.report([]string{"a"})
	clk := &clock{t: time.Unix(1000, 0)}
	c := New(src, time.Hour, clk.now)
	ctx := context.Background()
	get := func(since time.Time) []string {
		t.Helper()
		ns, err := c.NodesSince(ctx, since)
		if err != nil {
			t.Fatal(err)
		}
		return ids(ns)
	}
	if got := get(clk.now()); len(got) != 1 || src.calls.Load() != 1 {
		t.Fatalf("first: %v after %d list reads", got, src.calls.Load())
	}
	// Asked as of the time it was read: kept, nothing read.
	get(clk.now())
	if src.calls.Load() != 1 || src.verCalls.Load() != 1 {
		t.Fatalf("as of the read: %d list and %d version reads, want 1 and 1", src.calls.Load(), src.verCalls.Load())
	}
	// Later, nothing reported: the version confirms the kept list.
	clk.add(time.Millisecond)
	get(clk.now())
	if src.calls.Load() != 1 || src.verCalls.Load() != 2 {
		t.Fatalf("unchanged: %d list and %d version reads, want 1 and 2", src.calls.Load(), src.verCalls.Load())
	}
	// A node reports a room's first member; a push after it gets it,
	// though the kept list is far younger than the TTL.
	src.report([]string{"a", "b"})
	clk.add(time.Millisecond)
	if got := get(clk.now()); len(got) != 2 || src.calls.Load() != 2 {
		t.Fatalf("after a report: %v after %d list reads, want a, b after 2", got, src.calls.Load())
	}
	// Nodes (the TTL) still serves the kept list without any read.
	before := src.verCalls.Load()
	if _, err := c.Nodes(ctx); err != nil || src.verCalls.Load() != before {
		t.Fatalf("Nodes within the TTL read the version: %v", err)
	}
}

// TestNodesSinceWaitsForALaterRead: a caller whose time is after an
// in-flight read began does not take that read's answer (it may predate
// the report the caller needs): it waits for the next, shared by all
// such callers.
func TestNodesSinceWaitsForALaterRead(t *testing.T) {
	src := &versioned{}
	src.report([]string{"a"})
	clk := &clock{t: time.Unix(1000, 0)}
	c := New(src, time.Hour, clk.now)
	ctx := context.Background()
	gate := make(chan struct{})
	src.mu.Lock()
	src.gate = gate
	src.mu.Unlock()
	first := make(chan []string)
	go func() {
		ns, _ := c.NodesSince(ctx, clk.now())
		first <- ids(ns)
	}()
	waitCalls(t, &src.calls, 1)
	// While the first read is held, b reports and time moves on.
	src.report([]string{"a", "b"})
	clk.add(time.Millisecond)
	const later = 8
	results := make(chan []string, later)
	for range later {
		go func() {
			ns, _ := c.NodesSince(ctx, clk.now())
			results <- ids(ns)
		}()
	}
	close(gate)
	if got := <-first; len(got) < 1 {
		t.Fatalf("first read: %v", got)
	}
	for range later {
		if got := <-results; len(got) != 2 {
			t.Fatalf("a caller after the report got %v, want a and b", got)
		}
	}
	if n := src.calls.Load(); n != 2 {
		t.Fatalf("%d list reads for the later callers, want 1 shared (2 in all)", n)
	}
}

func waitCalls(t *testing.T, n *atomic.Int32, want int32) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for n.Load() < want {
		if time.Now().After(deadline) {
			t.Fatalf("%d calls, want %d", n.Load(), want)
		}
		time.Sleep(time.Millisecond) // polling a counter with a deadline
	}
}
