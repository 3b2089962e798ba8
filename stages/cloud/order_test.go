package cloud

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/proto/client"
	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// fakeHist is logic's history as the Logic RPCs show it: per stream an
// epoch, a top and the entries kept (those below keptFrom are trimmed).
type fakeHist struct {
	mu      sync.Mutex
	streams map[string]*fakeStream
	calls   int // History calls
	tops_   int // Tops calls
	// delay is how long each History call takes (a slow store); peak is
	// the most calls that were in flight at once.
	delay          time.Duration
	inflight, peak int
	// fail is how many History calls to come fail as unavailable.
	fail int
	// lag is how long a History reply takes to come back once read: what
	// is accepted meanwhile is past the reply's top.
	lag time.Duration
	// afterCall, if set, runs (h.mu held) after each History call: the
	// store changing between two calls.
	afterCall func(h *fakeHist)
}

type fakeStream struct {
	epoch    string
	top      uint64
	keptFrom uint64 // the oldest position kept; top+1: none (size 0)
	ackedPos uint64 // what ConnectReply.acked gives with acks on
	entries  map[uint64]*pb.HistoryEntry
	// noHistory: the stream's class keeps none (size 0); a position
	// behind the top is answered no_history, as logic does.
	noHistory bool
}

func newFakeHist() *fakeHist { return &fakeHist{streams: map[string]*fakeStream{}} }

// set makes stream's epoch, top and kept entries (positions from keptFrom
// to top, body "<pos>").
func (h *fakeHist) set(stream, epoch string, top, keptFrom uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	fs := &fakeStream{epoch: epoch, top: top, keptFrom: keptFrom, entries: map[uint64]*pb.HistoryEntry{}}
	for p := keptFrom; p <= top && p > 0; p++ {
		fs.entries[p] = &pb.HistoryEntry{Pos: p, Id: fmt.Sprint(stream, "/", epoch, "/", p), Op: 1000, Body: []byte(strconv.FormatUint(p, 10))}
	}
	h.streams[stream] = fs
}

// setNoHistory makes stream one of a class that keeps no history (size
// 0): positions up to top, no entries.
func (h *fakeHist) setNoHistory(stream, epoch string, top uint64) {
	h.set(stream, epoch, top, top+1)
	h.mu.Lock()
	defer h.mu.Unlock()
	h.streams[stream].noHistory = true
}

func (h *fakeHist) stream(name string) *fakeStream {
	fs := h.streams[name]
	if fs == nil {
		fs = &fakeStream{epoch: "e1", keptFrom: 1, entries: map[uint64]*pb.HistoryEntry{}}
		h.streams[name] = fs
	}
	return fs
}

func (h *fakeHist) tops(streams []string) []*pb.StreamPos {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]*pb.StreamPos, len(streams))
	for i, s := range streams {
		fs := h.stream(s)
		out[i] = &pb.StreamPos{Stream: s, Epoch: fs.epoch, Pos: fs.top}
	}
	return out
}

func (h *fakeHist) counts() (history, tops int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.calls, h.tops_
}

func streamsOf(mid int64, rooms []string) []string {
	out := []string{pipeline.UserStream(mid)}
	for _, r := range rooms {
		out = append(out, pipeline.RoomStream(r))
	}
	return out
}

func (f *fakeLogic) History(ctx context.Context, in *pb.HistoryReq, opts ...grpc.CallOption) (*pb.HistoryReply, error) {
	h := f.hist
	if h == nil {
		return nil, status.Error(codes.FailedPrecondition, "history is off")
	}
	h.mu.Lock()
	lag := h.lag
	if h.fail > 0 {
		h.fail--
		h.calls++
		h.mu.Unlock()
		return nil, status.Error(codes.Unavailable, "history store unavailable")
	}
	h.mu.Unlock()
	r, err := f.history(in)
	time.Sleep(lag) // the reply's way back, not synchronisation
	return r, err
}

func (f *fakeLogic) history(in *pb.HistoryReq) (*pb.HistoryReply, error) {
	h := f.hist
	h.mu.Lock()
	h.inflight++
	h.peak = max(h.peak, h.inflight)
	if d := h.delay; d > 0 {
		h.mu.Unlock()
		time.Sleep(d) // the store's latency, not synchronisation
		h.mu.Lock()
	}
	h.inflight--
	defer h.mu.Unlock()
	h.calls++
	if h.afterCall != nil {
		defer h.afterCall(h)
	}
	fs := h.stream(in.Stream)
	r := &pb.HistoryReply{Top: &pb.StreamPos{Stream: in.Stream, Epoch: fs.epoch, Pos: fs.top}}
	// The stores' contract (pipeline.History.Since, adapters/historytest):
	// epoch "" with after 0 is everything kept, never trimmed; a position
	// in the epoch is exact, so (epoch, 0) is trimmed once position 1 is
	// gone.
	after := in.After
	switch {
	case in.Epoch == "" && after == 0:
		after = max(fs.keptFrom, 1) - 1
	case in.Epoch != fs.epoch:
		r.Unrecoverable = "epoch"
		return r, nil
	case after > fs.top:
		r.Unrecoverable = "future"
		return r, nil
	case after < fs.top && after+1 < fs.keptFrom:
		r.Unrecoverable = "trimmed"
		if fs.noHistory {
			r.Unrecoverable = "no_history"
		}
		return r, nil
	}
	limit := int(in.Limit)
	if limit <= 0 {
		limit = 1000
	}
	for p := after + 1; p <= fs.top && len(r.Entries) < limit; p++ {
		if e := fs.entries[p]; e != nil {
			r.Entries = append(r.Entries, e)
		}
	}
	return r, nil
}

func (f *fakeLogic) Tops(_ context.Context, in *pb.TopsReq, _ ...grpc.CallOption) (*pb.TopsReply, error) {
	if f.hist == nil {
		return nil, status.Error(codes.FailedPrecondition, "history is off")
	}
	f.hist.mu.Lock()
	f.hist.tops_++
	f.hist.mu.Unlock()
	return &pb.TopsReply{Tops: f.hist.tops(in.Streams)}, nil
}

func (f *fakeLogic) Ack(context.Context, *pb.AckReq, ...grpc.CallOption) (*pb.AckReply, error) {
	return nil, status.Error(codes.Unimplemented, "")
}

// orderNode is a node whose logic keeps the history h.
func orderNode(t *testing.T, gap time.Duration, edit func(*config.Cloud)) (*node, *fakeHist) {
	t.Helper()
	h := newFakeHist()
	n := startNode(t, func(c *config.Cloud) {
		c.OrderGapWait = gap
		edit(c)
	})
	n.logic.mu.Lock()
	n.logic.hist = h
	n.logic.mu.Unlock()
	return n, h
}

// roomAt pushes body to room at (epoch, pos); id "" has none.
func (n *node) roomAt(t *testing.T, room, epoch string, pos uint64, id, body string) {
	t.Helper()
	p := &pb.Proto{Op: 1000, Body: []byte(body), Id: id}
	if pos > 0 {
		p.Positions = []*pb.StreamPos{{Stream: pipeline.RoomStream(room), Epoch: epoch, Pos: pos}}
	}
	if _, err := n.rpc.BroadcastRoom(context.Background(), &pb.BroadcastRoomReq{RoomId: room, Proto: p}); err != nil {
		t.Fatal(err)
	}
}

// readBodies reads the next want business messages' bodies.
func readBodies(t *testing.T, c *client.Conn, want int) []string {
	t.Helper()
	var got []string
	for len(got) < want {
		p, err := c.Read()
		if err != nil {
			t.Fatalf("read after %v: %v", got, err)
		}
		if p.Op >= wire.MinBusinessOp {
			got = append(got, string(p.Body))
		}
	}
	return got
}

func expectBodies(t *testing.T, c *client.Conn, want ...string) {
	t.Helper()
	got := readBodies(t, c, len(want))
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("client got %q, want %q", got, want)
	}
}

// TestOrderRoomOutOfOrder: positions 1, 3, 2 of a room reach its client
// as 1, 2, 3, without history (the gap wait is far longer than the test).
func TestOrderRoomOutOfOrder(t *testing.T) {
	for _, transport := range []string{"ws", "tcp"} {
		t.Run(transport, func(t *testing.T) {
			n, h := orderNode(t, time.Hour, func(*config.Cloud) {})
			c := n.connect(t, transport, claims{Mid: 1, Rooms: []string{"live://o"}})
			n.roomAt(t, "live://o", "e1", 1, "a", "1")
			n.roomAt(t, "live://o", "e1", 3, "c", "3")
			n.roomAt(t, "live://o", "e1", 2, "b", "2")
			expectBodies(t, c, "1", "2", "3")
			if calls, _ := h.counts(); calls != 0 {
				t.Fatalf("%d history calls for a gap job filled", calls)
			}
		})
	}
}

// TestOrderGapFilledFromHistory: a position that does not come within
// the gap wait is fetched from logic's history and delivered in order;
// job's late copy of it is then dropped.
func TestOrderGapFilledFromHistory(t *testing.T) {
	n, h := orderNode(t, 20*time.Millisecond, func(*config.Cloud) {})
	c := n.connect(t, "ws", claims{Mid: 1, Rooms: []string{"live://g"}})
	stream := pipeline.RoomStream("live://g")
	n.roomAt(t, "live://g", "e1", 1, stream+"/e1/1", "1")
	h.set(stream, "e1", 3, 1)
	n.roomAt(t, "live://g", "e1", 3, stream+"/e1/3", "3")
	expectBodies(t, c, "1", "2", "3")
	// job's delivery of 2 comes late: the same message id.
	n.roomAt(t, "live://g", "e1", 2, stream+"/e1/2", "2 again")
	// and without an id: position 2 is behind the stream.
	n.roomAt(t, "live://g", "e1", 2, "", "2 again")
	n.roomAt(t, "live://g", "e1", 4, "", "4")
	expectBodies(t, c, "4")
	if n.st.order.filled.Load() != 1 {
		t.Fatalf("filled %d from history, want 1", n.st.order.filled.Load())
	}
}

// TestOrderGapHistoryCannotFill: a gap history no longer has is skipped
// and counted, what follows flows, and the missing message, if it comes
// after all, is delivered late rather than lost.
func TestOrderGapHistoryCannotFill(t *testing.T) {
	for _, tc := range []struct {
		name string
		set  func(h *fakeHist, stream string)
	}{
		// Every entry trimmed: logic answers "trimmed".
		{"trimmed", func(h *fakeHist, stream string) { h.set(stream, "e1", 4, 5) }},
		// A class of size 0: logic answers "no_history".
		{"no history", func(h *fakeHist, stream string) { h.setNoHistory(stream, "e1", 4) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, h := orderNode(t, 20*time.Millisecond, func(*config.Cloud) {})
			c := n.connect(t, "tcp", claims{Mid: 1, Rooms: []string{"live://s"}})
			tc.set(h, pipeline.RoomStream("live://s"))
			n.roomAt(t, "live://s", "e1", 1, "a", "1")
			n.roomAt(t, "live://s", "e1", 3, "c", "3")
			n.roomAt(t, "live://s", "e1", 4, "d", "4")
			expectBodies(t, c, "1", "3", "4")
			if got := n.st.order.skipped.Load(); got != 1 {
				t.Fatalf("skipped %d positions, want 1", got)
			}
			n.roomAt(t, "live://s", "e1", 5, "e", "5")
			expectBodies(t, c, "5")
			n.roomAt(t, "live://s", "e1", 2, "b", "2 late")
			expectBodies(t, c, "2 late")
			if got := n.st.order.late.Load(); got != 1 {
				t.Fatalf("late %d, want 1", got)
			}
		})
	}
}

// TestOrderGapFillRetried: a gap fill logic does not answer is tried
// again after another gap wait, maxFillTries in all, before the gap is
// skipped: one failed call no longer costs the order.
func TestOrderGapFillRetried(t *testing.T) {
	for _, tc := range []struct {
		name      string
		fail      int
		want      []string
		filled    int64
		skippedAt int64
	}{
		{"answered at the last try", maxFillTries - 1, []string{"1", "2", "3"}, 1, 0},
		{"never answered", maxFillTries, []string{"1", "3"}, 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, h := orderNode(t, 10*time.Millisecond, func(*config.Cloud) {})
			c := n.connect(t, "tcp", claims{Mid: 1, Rooms: []string{"live://r"}})
			stream := pipeline.RoomStream("live://r")
			n.roomAt(t, "live://r", "e1", 1, stream+"/e1/1", "1")
			h.set(stream, "e1", 3, 1)
			h.mu.Lock()
			h.fail = tc.fail
			h.mu.Unlock()
			n.roomAt(t, "live://r", "e1", 3, stream+"/e1/3", "3")
			expectBodies(t, c, tc.want...)
			o := n.st.order
			if calls, _ := h.counts(); calls != maxFillTries || o.filled.Load() != tc.filled || o.skipped.Load() != tc.skippedAt {
				t.Fatalf("%d History calls, %d filled, %d skipped; want %d, %d, %d",
					calls, o.filled.Load(), o.skipped.Load(), maxFillTries, tc.filled, tc.skippedAt)
			}
		})
	}
}

// TestOrderTrimmedGapPartlyFilled: history that trimmed part of a gap
// still gives the rest of it.
func TestOrderTrimmedGapPartlyFilled(t *testing.T) {
	n, h := orderNode(t, 20*time.Millisecond, func(*config.Cloud) {})
	c := n.connect(t, "ws", claims{Mid: 1, Rooms: []string{"live://t"}})
	stream := pipeline.RoomStream("live://t")
	n.roomAt(t, "live://t", "e1", 1, "", "1")
	h.set(stream, "e1", 6, 4) // 2 and 3 trimmed, 4..6 kept
	n.roomAt(t, "live://t", "e1", 6, "", "6")
	expectBodies(t, c, "1", "4", "5", "6")
	if got := n.st.order.skipped.Load(); got != 2 {
		t.Fatalf("skipped %d, want 2", got)
	}
}

// TestOrderTrimmedGapEpochChanged: when the stream's epoch changes
// between the trimmed answer and the read of the oldest kept, those
// entries are of another epoch: nothing of them is delivered as this
// epoch's, and the gap is the lost epoch's, not a skip.
func TestOrderTrimmedGapEpochChanged(t *testing.T) {
	n, h := orderNode(t, 20*time.Millisecond, func(*config.Cloud) {})
	c := n.connect(t, "ws", claims{Mid: 1, Rooms: []string{"live://te"}})
	stream := pipeline.RoomStream("live://te")
	n.roomAt(t, "live://te", "e1", 1, "", "1")
	h.set(stream, "e1", 6, 4)
	h.mu.Lock()
	h.afterCall = func(h *fakeHist) {
		// The next read finds a new epoch whose entries 1..3 are kept.
		h.afterCall = nil
		fs := &fakeStream{epoch: "e2", top: 3, keptFrom: 1, entries: map[uint64]*pb.HistoryEntry{}}
		for p := uint64(1); p <= 3; p++ {
			fs.entries[p] = &pb.HistoryEntry{Pos: p, Op: 1000, Body: []byte("e2/" + strconv.FormatUint(p, 10))}
		}
		h.streams[stream] = fs
	}
	h.mu.Unlock()
	n.roomAt(t, "live://te", "e1", 6, "", "6")
	expectBodies(t, c, "1", "6")
	if got := n.st.order.skipped.Load(); got != 0 {
		t.Fatalf("skipped %d positions of a lost epoch, want 0", got)
	}
	n.roomAt(t, "live://te", "e2", 4, "", "e2/4")
	expectBodies(t, c, "e2/4")
}

// TestOrderDuplicatesDropped: a position already delivered is dropped,
// with or without an id (job retrying a call that had gone through).
func TestOrderDuplicatesDropped(t *testing.T) {
	n, _ := orderNode(t, time.Hour, func(*config.Cloud) {})
	c := n.connect(t, "ws", claims{Mid: 1, Rooms: []string{"live://d"}})
	n.roomAt(t, "live://d", "e1", 1, "", "1")
	n.roomAt(t, "live://d", "e1", 1, "", "1 again")
	n.roomAt(t, "live://d", "e1", 3, "", "3")
	n.roomAt(t, "live://d", "e1", 3, "", "3 again") // while held
	n.roomAt(t, "live://d", "e1", 2, "x", "2")
	n.roomAt(t, "live://d", "e1", 2, "x", "2 again")
	n.roomAt(t, "live://d", "e1", 2, "y", "2 again, another id")
	n.roomAt(t, "live://d", "", 0, "", "unpositioned")
	expectBodies(t, c, "1", "2", "3", "unpositioned")
	if got := n.st.order.dups.Load(); got != 3 {
		t.Fatalf("dropped %d duplicates by position, want 3", got)
	}
}

// TestOrderEpochChange: a new epoch restarts the stream at its message;
// the old epoch's stragglers are dropped.
func TestOrderEpochChange(t *testing.T) {
	n, _ := orderNode(t, time.Hour, func(*config.Cloud) {})
	c := n.connect(t, "tcp", claims{Mid: 1, Rooms: []string{"live://e"}})
	n.roomAt(t, "live://e", "e1", 1, "", "e1/1")
	n.roomAt(t, "live://e", "e1", 2, "", "e1/2")
	n.roomAt(t, "live://e", "e2", 1, "", "e2/1")
	n.roomAt(t, "live://e", "e2", 2, "", "e2/2")
	n.roomAt(t, "live://e", "e1", 3, "", "e1/3 stale")
	n.roomAt(t, "live://e", "e2", 4, "", "e2/4")
	n.roomAt(t, "live://e", "e2", 3, "", "e2/3")
	expectBodies(t, c, "e1/1", "e1/2", "e2/1", "e2/2", "e2/3", "e2/4")
	if got := n.st.order.resets.Load(); got != 1 {
		t.Fatalf("%d epoch resets, want 1", got)
	}
}

// TestOrderRoomJoinedMidStream: op 12 into a room the node does not host
// asks logic for its top; the client gets what comes after it, in order.
func TestOrderRoomJoinedMidStream(t *testing.T) {
	n, h := orderNode(t, time.Hour, func(*config.Cloud) {})
	stream := pipeline.RoomStream("live://m")
	h.set(stream, "e1", 5, 1)
	c := n.connect(t, "ws", claims{Mid: 1, Rooms: []string{"live://*"}})
	if _, err := c.Send(wire.OpChangeRoom, []byte("live://m")); err != nil {
		t.Fatal(err)
	}
	for {
		p, err := c.Read()
		if err != nil {
			t.Fatal(err)
		}
		if p.Op == wire.OpChangeRoomReply {
			break
		}
	}
	if _, tops := h.counts(); tops != 1 {
		t.Fatalf("%d Tops calls for a join, want 1", tops)
	}
	n.roomAt(t, "live://m", "e1", 7, "", "7")
	n.roomAt(t, "live://m", "e1", 5, "", "5, before the join")
	n.roomAt(t, "live://m", "e1", 6, "", "6")
	expectBodies(t, c, "6", "7")
}

// TestOrderUnknownTopAsked: a positioned message for a room whose top the
// node does not know (a client that connected while logic's history was
// unreadable) is held while the node asks logic, then delivered in order.
func TestOrderUnknownTopAsked(t *testing.T) {
	n, h := orderNode(t, time.Hour, func(*config.Cloud) {})
	n.logic.mu.Lock()
	n.logic.hist = nil // the connect gets no tops
	n.logic.mu.Unlock()
	c := n.connect(t, "tcp", claims{Mid: 1, Rooms: []string{"live://u"}})
	n.logic.mu.Lock()
	n.logic.hist = h
	n.logic.mu.Unlock()
	h.set(pipeline.RoomStream("live://u"), "e1", 9, 1)
	n.roomAt(t, "live://u", "e1", 9, "", "9")
	n.roomAt(t, "live://u", "e1", 10, "", "10")
	n.roomAt(t, "live://u", "e1", 8, "", "8 (was in flight)")
	n.roomAt(t, "live://u", "e1", 11, "", "11")
	// 8 may come before the top is known (held, then delivered in order
	// with the rest) or after (behind the top: dropped).
	var got []string
	for len(got) == 0 || got[len(got)-1] != "11" {
		got = append(got, readBodies(t, c, 1)...)
	}
	if fmt.Sprint(got) != fmt.Sprint([]string{"9", "10", "11"}) && fmt.Sprint(got) != fmt.Sprint([]string{"8 (was in flight)", "9", "10", "11"}) {
		t.Fatalf("client got %q", got)
	}
	if _, tops := h.counts(); tops != 1 {
		t.Fatalf("%d Tops calls, want 1", tops)
	}
}

// pushKeysAt pushes body to keys at the user stream position of mid.
func (n *node) pushKeysAt(t *testing.T, mid int64, pos uint64, id, body string, keys ...string) *pb.PushMsgReply {
	t.Helper()
	p := &pb.Proto{Op: 1000, Body: []byte(body), Id: id,
		Positions: []*pb.StreamPos{{Stream: pipeline.UserStream(mid), Epoch: "e1", Pos: pos}}}
	r, err := n.rpc.PushMsg(context.Background(), &pb.PushMsgReq{Keys: keys, Proto: p})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestOrderUserAcrossKeys: a user's two connections on the node get its
// stream in order, whichever keys each push names.
func TestOrderUserAcrossKeys(t *testing.T) {
	n, _ := orderNode(t, time.Hour, func(*config.Cloud) {})
	a := n.connect(t, "ws", claims{Mid: 7, Key: "a"})
	b := n.connect(t, "tcp", claims{Mid: 7, Key: "b"})
	if r := n.pushKeysAt(t, 7, 2, "m2", "2", "a", "b"); r.Delivered != 2 || len(r.Offline) != 0 {
		t.Fatalf("held push: %v, want 2 delivered", r)
	}
	n.pushKeysAt(t, 7, 1, "m1", "1", "a", "b")
	expectBodies(t, a, "1", "2")
	expectBodies(t, b, "1", "2")
	// 3 to a only, 4 to b only: b does not wait for 3.
	n.pushKeysAt(t, 7, 4, "m4", "4", "b")
	n.pushKeysAt(t, 7, 3, "m3", "3", "a")
	expectBodies(t, a, "3")
	expectBodies(t, b, "4")
	// job retries 4 to b (dropped: b has it) and to a, which it was not
	// for but job says it is now (a reconnect): delivered, late.
	n.pushKeysAt(t, 7, 4, "m4", "4 again", "b")
	n.pushKeysAt(t, 7, 5, "m5", "5", "a", "b")
	expectBodies(t, b, "5")
	expectBodies(t, a, "5")
	// An offline key is offline, as without positions.
	if r := n.pushKeysAt(t, 7, 6, "m6", "6", "gone"); len(r.Offline) != 1 {
		t.Fatalf("offline key: %v", r)
	}
}

// TestOrderUserGapFilledToEveryConnection: a user stream's gap filled from
// history reaches each of the user's connections here, once.
func TestOrderUserGapFilledToEveryConnection(t *testing.T) {
	n, h := orderNode(t, 20*time.Millisecond, func(*config.Cloud) {})
	a := n.connect(t, "ws", claims{Mid: 8, Key: "a"})
	b := n.connect(t, "ws", claims{Mid: 8, Key: "b"})
	stream := pipeline.UserStream(8)
	h.set(stream, "e1", 2, 1)
	n.pushKeysAt(t, 8, 2, "", "2", "a", "b")
	expectBodies(t, a, "1", "2")
	expectBodies(t, b, "1", "2")
	// job's copy of 1 is not delivered again: job names it as logic
	// published it, the entry's id and the node ("<msg_id>/<node>").
	n.pushKeysAt(t, 8, 1, stream+"/e1/1/node1", "1 again", "a", "b")
	n.pushKeysAt(t, 8, 3, "", "3", "a", "b")
	expectBodies(t, a, "3")
	expectBodies(t, b, "3")
}

// TestOrderBounds: a flood of far-future positions holds at most
// maxHeldPerStream messages (the rest go out unordered, counted), history
// then says they are past the stream's top and they are released.
func TestOrderBounds(t *testing.T) {
	n, h := orderNode(t, 50*time.Millisecond, func(c *config.Cloud) {
		c.SendQueue = 1 << 20
		c.SendQueueBytes = 1 << 30
	})
	c := n.connect(t, "tcp", claims{Mid: 1, Rooms: []string{"live://b"}})
	h.set(pipeline.RoomStream("live://b"), "e1", 1, 1)
	n.roomAt(t, "live://b", "e1", 1, "", "1")
	const flood = maxHeldPerStream + 500
	for i := range flood {
		n.roomAt(t, "live://b", "e1", 1_000_000+uint64(i), "", "far")
		if held := n.st.order.held.Load(); held > maxHeldPerStream {
			t.Fatalf("holding %d messages, the bound is %d", held, maxHeldPerStream)
		}
	}
	if n.st.order.unordered.Load() == 0 {
		t.Fatal("nothing was delivered over the bound")
	}
	// The fill the bound started finds them past the top: released.
	waitFor(t, "the held flood to be released", func() bool { return n.st.order.held.Load() == 0 })
	got := readBodies(t, c, flood+1)
	if got[0] != "1" || len(got) != flood+1 {
		t.Fatalf("client got %d messages starting %q", len(got), got[0])
	}

}

// TestOrderSweep: a stream whose clients left is dropped at the second
// sweep, with what it held.
func TestOrderSweep(t *testing.T) {
	n, h := orderNode(t, time.Hour, func(*config.Cloud) {})
	c := n.connect(t, "tcp", claims{Mid: 1, Rooms: []string{"live://b"}})
	h.set(pipeline.RoomStream("live://b"), "e1", 1, 1)
	n.roomAt(t, "live://b", "e1", 5_000_000, "", "held")
	if n.st.order.held.Load() != 1 {
		t.Fatalf("held %d, want 1", n.st.order.held.Load())
	}
	_ = c.Close()
	waitFor(t, "the client to leave", func() bool { return !n.st.roomHosted("live://b") })
	n.st.order.sweep()
	if n.st.order.streamCount() == 0 {
		t.Fatal("a stream was dropped at its first idle sweep")
	}
	n.st.order.sweep()
	if got, held := n.st.order.streamCount(), n.st.order.held.Load(); got != 0 || held != 0 {
		t.Fatalf("after two idle sweeps: %d streams, %d held; want none", got, held)
	}
	// A push to the room now remembers nothing.
	n.roomAt(t, "live://b", "e1", 5_000_001, "", "nobody")
	if got := n.st.order.streamCount(); got != 0 {
		t.Fatalf("a push to a room nobody is in created %d streams", got)
	}
}

// TestOrderHistoryOff: positioned pushes through a logic without history
// still flow, in order from the first one seen.
func TestOrderHistoryOff(t *testing.T) {
	n := startNode(t, func(c *config.Cloud) { c.OrderGapWait = 20 * time.Millisecond })
	c := n.connect(t, "ws", claims{Mid: 1, Rooms: []string{"live://f"}})
	n.roomAt(t, "live://f", "e1", 4, "", "4")
	n.roomAt(t, "live://f", "e1", 6, "", "6")
	n.roomAt(t, "live://f", "e1", 5, "", "5")
	expectBodies(t, c, "4", "5", "6")
	n.roomAt(t, "live://f", "e1", 8, "", "8")
	expectBodies(t, c, "8") // 7 never comes: skipped after the wait
}

// TestOrderKeyOfflineAtFirstCallGetsTheRetry: a positioned key push (named
// "<msg_id>/<node>", as job names it) to a key not connected yet answers
// it offline, and job's retry with the same id reaches the key once it is
// back. The pair marked under the history id was left behind by the
// offline answer, and the retry was taken for a duplicate: 74 of 1,000
// pushes were lost in TestIntegrationCloudRestartWithBacklog.
func TestOrderKeyOfflineAtFirstCallGetsTheRetry(t *testing.T) {
	n, h := orderNode(t, 50*time.Millisecond, func(*config.Cloud) {})
	sp := h.appendMsg(pipeline.UserStream(4), "m")
	req := &pb.PushMsgReq{Keys: []string{"k4"}, Proto: &pb.Proto{Op: 1000, Body: []byte("m"), Id: "msg-1/node-a", Positions: []*pb.StreamPos{sp}}}
	r, err := n.rpc.PushMsg(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Offline) != 1 {
		t.Fatalf("first call to an absent key: %+v, want it offline", r)
	}
	c := n.connect(t, "tcp", claims{Mid: 4, Key: "k4"})
	if r, err = n.rpc.PushMsg(context.Background(), req); err != nil || len(r.Offline) != 0 || r.Delivered != 1 {
		t.Fatalf("retry once the key is back: %+v %v, want delivered", r, err)
	}
	if got := readBodies(t, c, 1); got[0] != "m" {
		t.Fatalf("key got %q, want the retried push", got)
	}
}
