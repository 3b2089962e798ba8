package job

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"imcloud/proto/pb"
)

// fakeCalls records BroadcastRoom calls by address; a node whose address
// is in hang answers only when its context ends.
type fakeCalls struct {
	mu    sync.Mutex
	calls map[string][][]uint64 // positions of each call's protos
	hang  map[string]bool
}

func (f *fakeCalls) call(ctx context.Context, addr string, req *pb.BroadcastRoomReq) error {
	f.mu.Lock()
	hang := f.hang[addr]
	f.mu.Unlock()
	if hang {
		<-ctx.Done()
		return ctx.Err()
	}
	protos := req.Batch
	if req.Proto != nil {
		protos = []*pb.Proto{req.Proto}
	}
	var pos []uint64
	for _, p := range protos {
		pos = append(pos, p.Positions[0].Pos)
	}
	f.mu.Lock()
	f.calls[addr] = append(f.calls[addr], pos)
	f.mu.Unlock()
	return nil
}

func (f *fakeCalls) sent(addr string) []uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []uint64
	for _, c := range f.calls[addr] {
		out = append(out, c...)
	}
	return out
}

func roomProto(pos uint64) *pb.Proto {
	return &pb.Proto{Op: 1000, Positions: []*pb.StreamPos{{Stream: "room:live://1", Epoch: "e", Pos: pos}}}
}

// TestRoomQueueRecordsWhoTookIt: with one node that never answers, the
// nodes that took the push are still reported when the attempt ends, so a
// retry skips them; the push left queued for the dead node is not sent.
func TestRoomQueueRecordsWhoTookIt(t *testing.T) {
	f := &fakeCalls{calls: map[string][][]uint64{}, hang: map[string]bool{"addr-a": true}}
	r := newRoomQueues(256, 400*time.Millisecond, f.call)
	nodes := map[string]string{"a": "addr-a", "b": "addr-b", "c": "addr-c"}
	// The first push occupies a's queue with a call that hangs.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	ok, err := r.send(ctx, "live://1", nodes, roomProto(1))
	cancel()
	if !slices.Equal(ok, []string{"b", "c"}) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("ok %v err %v, want b and c, and the deadline", ok, err)
	}
	// The second waits behind it on a, and its attempt ends there.
	ctx, cancel = context.WithTimeout(context.Background(), 50*time.Millisecond)
	ok, _ = r.send(ctx, "live://1", nodes, roomProto(2))
	cancel()
	if !slices.Equal(ok, []string{"b", "c"}) {
		t.Fatalf("ok %v, want b and c", ok)
	}
	// a comes back: what was abandoned on its queue is not sent to it.
	f.mu.Lock()
	f.hang["addr-a"] = false
	f.mu.Unlock()
	ok, err = r.send(context.Background(), "live://1", nodes, roomProto(3))
	if err != nil || len(ok) != 3 {
		t.Fatalf("ok %v err %v after a came back", ok, err)
	}
	if got := f.sent("addr-a"); !slices.Equal(got, []uint64{3}) {
		t.Fatalf("a was sent positions %v, want only 3 (1 timed out, 2 was abandoned)", got)
	}
}

// TestRoomQueueSendsInPositionOrder: pushes that wait for a node go in
// position order, however they arrived, in calls of at most size.
func TestRoomQueueSendsInPositionOrder(t *testing.T) {
	f := &fakeCalls{calls: map[string][][]uint64{}, hang: map[string]bool{}}
	gate := make(chan struct{})
	first := true
	var mu sync.Mutex
	call := func(ctx context.Context, addr string, req *pb.BroadcastRoomReq) error {
		mu.Lock()
		wait := first
		first = false
		mu.Unlock()
		if wait {
			<-gate
		}
		return f.call(ctx, addr, req)
	}
	r := newRoomQueues(4, 10*time.Second, call)
	nodes := map[string]string{"n": "addr-n"}
	var wg sync.WaitGroup
	wg.Go(func() { _, _ = r.send(context.Background(), "live://1", nodes, roomProto(1)) })
	// Wait until position 1's call is out, then queue 10 down to 2.
	waitCallOut(t, r, roomNode{"live://1", "n"})
	deadline := time.Now().Add(5 * time.Second)
	for pos := uint64(10); pos >= 2; pos-- {
		wg.Go(func() { _, _ = r.send(context.Background(), "live://1", nodes, roomProto(pos)) })
	}
	for {
		r.mu.Lock()
		n := len(r.queues[roomNode{"live://1", "n"}].pending)
		r.mu.Unlock()
		if n == 9 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d queued, want 9", n)
		}
		time.Sleep(time.Millisecond)
	}
	close(gate)
	wg.Wait()
	if got := f.sent("addr-n"); !slices.Equal(got, []uint64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}) {
		t.Fatalf("sent %v, want 1 to 10 in order", got)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.calls["addr-n"] {
		if len(c) > 4 {
			t.Fatalf("a call of %d, over the size 4", len(c))
		}
	}
}

// TestRoomQueueBounded: a queue holds at most maxQueued; past it a push
// fails at once for that node.
func TestRoomQueueBounded(t *testing.T) {
	f := &fakeCalls{calls: map[string][][]uint64{}, hang: map[string]bool{"addr-a": true}}
	r := newRoomQueues(256, 2*time.Second, f.call)
	key := roomNode{"live://1", "a"}
	r.mu.Lock()
	r.queues[key] = &roomQueue{addr: "addr-a", pending: make([]*roomItem, maxQueued)}
	r.mu.Unlock()
	_, err := r.send(context.Background(), "live://1", map[string]string{"a": "addr-a"}, roomProto(1))
	if !errors.Is(err, errQueueFull) {
		t.Fatalf("%v, want errQueueFull", err)
	}
}

// TestRoomQueueBatchesInOrder: a window batch goes through the room's
// queue to each node like single pushes, so two batches reach a node one
// after the other, in the order they were sent, where they once went as
// concurrent calls.
func TestRoomQueueBatchesInOrder(t *testing.T) {
	f := &fakeCalls{calls: map[string][][]uint64{}, hang: map[string]bool{}}
	r := newRoomQueues(256, 2*time.Second, f.call)
	nodes := map[string]string{"a": "addr-a", "b": "addr-b"}
	for _, batch := range [][]uint64{{1, 2, 3}, {4, 5}} {
		ps := make([]*pb.Proto, len(batch))
		for i, pos := range batch {
			ps[i] = roomProto(pos)
		}
		oks, err := r.sendAll(context.Background(), "live://1", nodes, ps)
		for i, ok := range oks {
			if err != nil || !slices.Equal(ok, []string{"a", "b"}) {
				t.Fatalf("batch %v, push %d: ok %v, err %v", batch, i, ok, err)
			}
		}
	}
	for _, addr := range []string{"addr-a", "addr-b"} {
		if got := f.sent(addr); !slices.Equal(got, []uint64{1, 2, 3, 4, 5}) {
			t.Fatalf("%s got %v, want 1 to 5 in order", addr, got)
		}
	}
}

// TestRoomQueueClose: close ends a call in flight (a node that never
// answers), returns only once the queues' goroutines are gone, and fails
// what is sent after it at once.
func TestRoomQueueClose(t *testing.T) {
	f := &fakeCalls{calls: map[string][][]uint64{}, hang: map[string]bool{"addr-a": true}}
	r := newRoomQueues(256, time.Hour, f.call)
	nodes := map[string]string{"a": "addr-a"}
	sent := make(chan error, 1)
	go func() {
		_, err := r.send(context.Background(), "live://1", nodes, roomProto(1))
		sent <- err
	}()
	waitCallOut(t, r, roomNode{"live://1", "a"})
	r.close()
	if err := <-sent; !errors.Is(err, context.Canceled) {
		t.Fatalf("the call in flight ended with %v, want it cancelled by close", err)
	}
	r.mu.Lock()
	left := len(r.queues)
	r.mu.Unlock()
	if left != 0 {
		t.Fatalf("%d queues left after close", left)
	}
	if _, err := r.send(context.Background(), "live://1", nodes, roomProto(2)); !errors.Is(err, errQueuesClosed) {
		t.Fatalf("send after close: %v, want errQueuesClosed", err)
	}
}

// TestRoomQueueBatchSplitRecordsEach: a window batch larger than a call
// goes in several; when one fails, only its pushes miss the node, so a
// retry of the others skips it (no push delivered twice).
func TestRoomQueueBatchSplitRecordsEach(t *testing.T) {
	var mu sync.Mutex
	calls := 0
	call := func(ctx context.Context, addr string, req *pb.BroadcastRoomReq) error {
		mu.Lock()
		defer mu.Unlock()
		calls++
		if calls == 2 {
			return errors.New("node lost the second call")
		}
		return nil
	}
	r := newRoomQueues(4, 2*time.Second, call)
	ps := make([]*pb.Proto, 6)
	for i := range ps {
		ps[i] = roomProto(uint64(i + 1))
	}
	oks, err := r.sendAll(context.Background(), "live://1", map[string]string{"a": "addr-a"}, ps)
	if err == nil {
		t.Fatal("a failed call reported no error")
	}
	for i, ok := range oks {
		if want := i < 4; want != slices.Equal(ok, []string{"a"}) {
			t.Fatalf("push %d: ok %v, want the node only for the first call's 4", i+1, ok)
		}
	}
}

// waitCallOut waits until key's queue has sent all it held: its call is
// out.
func waitCallOut(t *testing.T, r *roomQueues, key roomNode) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		r.mu.Lock()
		q := r.queues[key]
		out := q != nil && len(q.pending) == 0
		r.mu.Unlock()
		if out {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no call to %s went out", key.node)
		}
		time.Sleep(time.Millisecond) // polling a condition, with a deadline
	}
}

// send queues p for room on each of nodes (id to address) and waits until
// each took it or failed, or ctx ends. ok are the nodes that took it.
func (r *roomQueues) send(ctx context.Context, room string, nodes map[string]string, p *pb.Proto) (ok []string, err error) {
	oks, err := r.sendAll(ctx, room, nodes, []*pb.Proto{p})
	return oks[0], err
}
