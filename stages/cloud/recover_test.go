package cloud

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/proto/client"
	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// acked is the acknowledged position the fake logic gives a connection
// with acks on: the stream's ackedPos in its epoch.
func (h *fakeHist) acked(stream string) *pb.StreamPos {
	h.mu.Lock()
	defer h.mu.Unlock()
	fs := h.stream(stream)
	return &pb.StreamPos{Stream: stream, Epoch: fs.epoch, Pos: fs.ackedPos}
}

// appendMsg gives body the next position of stream, as logic at accept,
// and returns it.
func (h *fakeHist) appendMsg(stream, body string) *pb.StreamPos {
	h.mu.Lock()
	defer h.mu.Unlock()
	fs := h.stream(stream)
	fs.top++
	if fs.noHistory {
		fs.keptFrom = fs.top + 1
	} else {
		fs.entries[fs.top] = &pb.HistoryEntry{Pos: fs.top, Id: fmt.Sprint(stream, "/", fs.epoch, "/", fs.top), Op: 1000, Body: []byte(body)}
	}
	return &pb.StreamPos{Stream: stream, Epoch: fs.epoch, Pos: fs.top}
}

// trim drops the entries below keptFrom.
func (h *fakeHist) trim(stream string, keptFrom uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	fs := h.stream(stream)
	for p := range fs.entries {
		if p < keptFrom {
			delete(fs.entries, p)
		}
	}
	fs.keptFrom = keptFrom
}

// pushRoom accepts body into room's stream and delivers it as job would.
func (n *node) pushRoom(t testing.TB, h *fakeHist, room, body string) uint64 {
	t.Helper()
	sp := h.appendMsg(pipeline.RoomStream(room), body)
	p := &pb.Proto{Op: 1000, Body: []byte(body), Id: fmt.Sprint("r", sp.Pos), Positions: []*pb.StreamPos{sp}}
	if _, err := n.rpc.BroadcastRoom(context.Background(), &pb.BroadcastRoomReq{RoomId: room, Proto: p}); err != nil {
		t.Fatal(err)
	}
	return sp.Pos
}

// pushUser accepts body into mid's stream and delivers it to keys.
func (n *node) pushUser(t testing.TB, h *fakeHist, mid int64, body string, keys ...string) uint64 {
	t.Helper()
	sp := h.appendMsg(pipeline.UserStream(mid), body)
	p := &pb.Proto{Op: 1000, Body: []byte(body), Id: fmt.Sprint("u", sp.Pos), Positions: []*pb.StreamPos{sp}}
	if _, err := n.rpc.PushMsg(context.Background(), &pb.PushMsgReq{Keys: keys, Proto: p}); err != nil {
		t.Fatal(err)
	}
	return sp.Pos
}

// connectWith connects with claims, keeping positions in ps (nil: its
// own), and returns the op 8 reply.
func (n *node) connectWith(t testing.TB, transport string, cl claims, ps *client.Positions) (*client.Conn, client.AuthReply) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	c, err := client.Dial(ctx, n.target(transport), client.Options{Positions: ps})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	_ = c.SetReadDeadline(time.Now().Add(wait))
	tok, _ := json.Marshal(cl)
	r, err := c.Auth(tok)
	if err != nil {
		t.Fatalf("auth: %v", err)
	}
	return c, r
}

// readStream reads the next want positioned messages (skipping other
// packets) and returns them as "stream@pos=body", failing on a gap or a
// duplicate.
func readStream(t testing.TB, c *client.Conn, want int) []string {
	t.Helper()
	var got []string
	for len(got) < want {
		m, err := c.ReadMessage()
		if err != nil {
			t.Fatalf("read after %d messages (last %v): %v", len(got), lastOf(got), err)
		}
		if m.Stream == "" {
			continue
		}
		if m.Gap || m.Dup {
			t.Fatalf("%s@%d: gap %v dup %v after %v", m.Stream, m.Pos, m.Gap, m.Dup, lastOf(got))
		}
		got = append(got, fmt.Sprintf("%s@%d=%s", m.Stream, m.Pos, m.Body))
	}
	return got
}

func lastOf(s []string) string {
	if len(s) == 0 {
		return "nothing"
	}
	return s[len(s)-1]
}

// recoverNode is a node whose logic keeps history.
func recoverNode(t *testing.T, edit func(*config.Cloud)) (*node, *fakeHist) {
	t.Helper()
	return orderNode(t, 50*time.Millisecond, edit)
}

// TestPositionedFrames: a connection that opted in gets room and user
// pushes as op 20 with their stream, epoch and position, and broadcasts
// as today; one that did not gets exactly the bytes it got before (op 8
// and business packets, compared byte for byte on a raw TCP socket).
func TestPositionedFrames(t *testing.T) {
	n, h := recoverNode(t, func(*config.Cloud) {})
	h.set(pipeline.RoomStream("live://1"), "e1", 3, 1)
	h.set(pipeline.UserStream(2), "u1", 5, 1)

	in, _ := n.connectWith(t, "tcp", claims{Mid: 1, Key: "in", Rooms: []string{"live://1"}, Recover: true}, nil)
	if _, err := in.Recover(nil); err != nil {
		t.Fatal(err)
	}

	raw, err := net.Dial("tcp", n.tcpAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	tok := []byte(`{"mid":2,"key":"out","rooms":["live://1"]}`)
	if _, err := raw.Write(wire.Encode(wire.OpAuth, 1, tok)); err != nil {
		t.Fatal(err)
	}
	want := wire.Encode(wire.OpAuthReply, 0, fmt.Appendf(nil, `{"mid":2,"key":"out","rooms":["live://1"],"heartbeat":%d}`, int64(n.st.cfg.HeartbeatInterval/time.Second)))
	got := make([]byte, len(want))
	_ = raw.SetReadDeadline(time.Now().Add(wait))
	if _, err := io.ReadFull(raw, got); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("op 8 of a goim client: %q (%v), want %q", got, err, want)
	}

	n.pushRoom(t, h, "live://1", "room-4")
	n.pushUser(t, h, 2, "user-6", "out")
	if _, err := n.rpc.Broadcast(context.Background(), broadcastReq(1001, "all")); err != nil {
		t.Fatal(err)
	}

	// Each packet is exactly goim's, numbered in the order written (a
	// broadcast may overtake the others).
	pending := map[string]int32{"room-4": 1000, "user-6": 1000, "all": 1001}
	for seq := int32(1); seq <= 3; seq++ {
		var h [wire.HeaderLen]byte
		if _, err := io.ReadFull(raw, h[:]); err != nil {
			t.Fatal(err)
		}
		pkt := make([]byte, binary.BigEndian.Uint32(h[:4]))
		copy(pkt, h[:])
		if _, err := io.ReadFull(raw, pkt[wire.HeaderLen:]); err != nil {
			t.Fatal(err)
		}
		body := string(pkt[wire.HeaderLen:])
		op, ok := pending[body]
		if want := wire.Encode(op, seq, []byte(body)); !ok || !bytes.Equal(pkt, want) {
			t.Fatalf("packet %d to a goim client: %q, want one of %v as goim sends it (%q)", seq, pkt, pending, want)
		}
		delete(pending, body)
	}

	// Broadcasts promise no order relative to other pushes.
	var positioned, plain int
	for range 2 {
		m, err := in.ReadMessage()
		switch {
		case err != nil:
			t.Fatal(err)
		case m.Op == 1000 && m.Stream == "room:live://1" && m.Epoch == "e1" && m.Pos == 4 && string(m.Body) == "room-4":
			positioned++
		case m.Op == 1001 && m.Stream == "" && string(m.Body) == "all":
			plain++
		default:
			t.Fatalf("opted-in client got %+v", m)
		}
	}
	if positioned != 1 || plain != 1 {
		t.Fatalf("opted-in client: %d positioned room pushes, %d plain broadcasts; want 1 each", positioned, plain)
	}
}

// TestOpAuthReplyOptedIn: op 8 of a connection that opted in says so,
// whether acks are on, and where each of its streams starts (the acked
// position for the user stream when acks are on); never an empty epoch.
func TestOpAuthReplyOptedIn(t *testing.T) {
	n, h := recoverNode(t, func(*config.Cloud) {})
	h.set(pipeline.RoomStream("live://1"), "r1", 7, 1)
	h.set(pipeline.UserStream(3), "u1", 9, 1)
	h.mu.Lock()
	h.stream(pipeline.UserStream(3)).ackedPos = 4
	h.mu.Unlock()
	for _, tc := range []struct {
		acks bool
		user uint64
	}{{false, 9}, {true, 4}} {
		t.Run(fmt.Sprint("acks=", tc.acks), func(t *testing.T) {
			_, r := n.connectWith(t, "ws", claims{Mid: 3, Key: fmt.Sprint("k", tc.acks), Rooms: []string{"live://1"}, Recover: true, Acks: tc.acks}, nil)
			want := []wire.StreamPos{{Stream: "user:3", Epoch: "u1", Pos: tc.user}, {Stream: "room:live://1", Epoch: "r1", Pos: 7}}
			if !r.Recover || r.Acks != tc.acks || fmt.Sprint(r.Streams) != fmt.Sprint(want) {
				t.Fatalf("op 8 %+v, want recover, acks %v, streams %v", r, tc.acks, want)
			}
		})
	}
}

// TestRecoverHappyPath: a client away for 100 room pushes and 100 user
// pushes comes back with its positions, is told both streams are
// recovered, receives all 200 in order, then live ones.
func TestRecoverHappyPath(t *testing.T) {
	n, h := recoverNode(t, func(*config.Cloud) {})
	cl := claims{Mid: 5, Key: "k5", Rooms: []string{"live://9"}, Recover: true}
	for i := 1; i <= 10; i++ {
		n.pushRoom(t, h, "live://9", fmt.Sprint("r", i))
		n.pushUser(t, h, 5, fmt.Sprint("u", i))
	}
	ps := client.NewPositions()
	c, _ := n.connectWith(t, "ws", cl, ps)
	if _, err := c.Resume(); err != nil {
		t.Fatal(err)
	}
	_ = c.Close()
	waitFor(t, "k5 disconnected", func() bool { return n.logic.disconnected("k5") > 0 })

	for i := 11; i <= 110; i++ {
		n.pushRoom(t, h, "live://9", fmt.Sprint("r", i))
		n.pushUser(t, h, 5, fmt.Sprint("u", i), "k5")
	}
	c, _ = n.connectWith(t, "ws", cl, ps)
	r, err := c.Resume()
	if err != nil {
		t.Fatal(err)
	}
	wantReply := `{[{room:live://9 true  e1 110} {user:5 true  e1 110}]}`
	if fmt.Sprint(r) != wantReply {
		t.Fatalf("op 22 %v, want %s", r, wantReply)
	}
	got := readStream(t, c, 200)
	var room, user []string
	for _, g := range got {
		if g[:5] == "room:" {
			room = append(room, g)
		} else {
			user = append(user, g)
		}
	}
	for i := range 100 {
		if w := fmt.Sprintf("room:live://9@%d=r%d", i+11, i+11); room[i] != w {
			t.Fatalf("room message %d: %s, want %s", i, room[i], w)
		}
		if w := fmt.Sprintf("user:5@%d=u%d", i+11, i+11); user[i] != w {
			t.Fatalf("user message %d: %s, want %s", i, user[i], w)
		}
	}
	n.pushRoom(t, h, "live://9", "live-room")
	n.pushUser(t, h, 5, "live-user", "k5")
	live := readStream(t, c, 2)
	slices.Sort(live) // the streams' messages may interleave
	if live[0] != "room:live://9@111=live-room" || live[1] != "user:5@111=live-user" {
		t.Fatalf("live after recovery: %v", live)
	}
}

// TestRecoverSeam: pushes go on while the client reconnects and recovers;
// it ends with every position once, in order — no gap, no duplicate at
// the seam between history and live.
func TestRecoverSeam(t *testing.T) {
	for _, transport := range []string{"ws", "tcp"} {
		t.Run(transport, func(t *testing.T) {
			n, h := recoverNode(t, func(*config.Cloud) {})
			cl := claims{Mid: 6, Key: "k6", Rooms: []string{"live://s"}, Recover: true}
			ps := client.NewPositions()
			c, _ := n.connectWith(t, transport, cl, ps)
			if _, err := c.Resume(); err != nil {
				t.Fatal(err)
			}
			n.pushRoom(t, h, "live://s", "1")
			n.pushUser(t, h, 6, "1", "k6")
			readStream(t, c, 2)
			_ = c.Close()
			waitFor(t, "k6 disconnected", func() bool { return n.logic.disconnected("k6") > 0 })

			var stop atomic.Bool
			var pushed atomic.Int64
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				// At most 400 per stream: a slow moment must not push the
				// connection's hold (1,024 messages) past its cap, which
				// ends a recovery with 4503 by design.
				for i := 2; i < 400 && (!stop.Load() || i < 300); i++ {
					n.pushRoom(t, h, "live://s", strconv.Itoa(i))
					n.pushUser(t, h, 6, strconv.Itoa(i), "k6")
					pushed.Store(int64(i))
				}
			}()
			waitFor(t, "50 pushes", func() bool { return pushed.Load() >= 50 })
			c, _ = n.connectWith(t, transport, cl, ps)
			r, err := c.Resume()
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range r.Streams {
				if !s.Recovered {
					t.Fatalf("op 22 %+v", r)
				}
			}
			stop.Store(true)
			wg.Wait()
			last := uint64(pushed.Load())
			got := readStream(t, c, int(2*(last-1)))
			next := map[string]uint64{"room:live://s": 2, "user:6": 2}
			for _, g := range got {
				var stream string
				var pos uint64
				var body string
				if _, err := fmt.Sscanf(g, "%s", &stream); err != nil {
					t.Fatal(err)
				}
				at := bytes.LastIndexByte([]byte(g), '@')
				stream = g[:at]
				if _, err := fmt.Sscanf(g[at+1:], "%d=%s", &pos, &body); err != nil {
					t.Fatalf("%s: %v", g, err)
				}
				if pos != next[stream] || body != strconv.FormatUint(pos, 10) {
					t.Fatalf("%s: want position %d of %s", g, next[stream], stream)
				}
				next[stream]++
			}
			if next["room:live://s"] != last+1 || next["user:6"] != last+1 {
				t.Fatalf("ended at %v, want %d each", next, last+1)
			}
		})
	}
}

// TestRecoverNotRecovered: a position history cannot serve is answered
// with the reason, the stream's current epoch and top, and live messages
// follow from that top; a stream the connection does not receive is
// "forbidden" (a reply, not a close).
func TestRecoverNotRecovered(t *testing.T) {
	n, h := recoverNode(t, func(*config.Cloud) {})
	h.set(pipeline.RoomStream("live://t"), "e1", 50, 1)
	h.trim(pipeline.RoomStream("live://t"), 40)
	h.set(pipeline.UserStream(7), "e2", 20, 1)
	h.set(pipeline.RoomStream("live://far"), "e1", maxRecoverEntries+20, maxRecoverEntries+20)
	cl := claims{Mid: 7, Key: "k7", Rooms: []string{"live://t", "live://far"}, Recover: true}
	c, _ := n.connectWith(t, "ws", cl, nil)
	r, err := c.Recover([]wire.StreamPos{
		{Stream: "room:live://t", Epoch: "e1", Pos: 10},
		{Stream: "user:7", Epoch: "old", Pos: 3},
		{Stream: "room:live://far", Epoch: "e1", Pos: 1},
		{Stream: "room:other://x", Epoch: "e1", Pos: 3},
		{Stream: "user:8", Epoch: "e1", Pos: 3},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []wire.RecoverResult{
		{Stream: "room:live://t", Reason: "trimmed", Epoch: "e1", Pos: 50},
		{Stream: "user:7", Reason: "epoch", Epoch: "e2", Pos: 20},
		{Stream: "room:live://far", Reason: "trimmed", Epoch: "e1", Pos: maxRecoverEntries + 20},
		{Stream: "room:other://x", Reason: "forbidden", Epoch: "e1", Pos: 3},
		{Stream: "user:8", Reason: "forbidden", Epoch: "e1", Pos: 3},
	}
	if fmt.Sprint(r.Streams) != fmt.Sprint(want) {
		t.Fatalf("op 22\n got %v\nwant %v", r.Streams, want)
	}
	n.pushRoom(t, h, "live://t", "51")
	if got := readStream(t, c, 1); got[0] != "room:live://t@51=51" {
		t.Fatalf("live after trimmed: %v", got)
	}

	c2, _ := n.connectWith(t, "tcp", claims{Mid: 9, Key: "k9", Recover: true}, nil)
	r, err = c2.Recover([]wire.StreamPos{{Stream: "user:9", Epoch: "e1", Pos: 5}})
	if err != nil {
		t.Fatal(err)
	}
	if w := `[{user:9 false future e1 0}]`; fmt.Sprint(r.Streams) != w {
		t.Fatalf("future position: %v, want %s", r.Streams, w)
	}
}

// TestRecoverNoHistory: a stream whose class keeps no history (size 0)
// is answered with logic's reason, no_history, when messages were missed,
// with the top the client moves to; at the top it is recovered (nothing
// was missed). Live messages follow either way.
func TestRecoverNoHistory(t *testing.T) {
	n, h := recoverNode(t, func(*config.Cloud) {})
	h.setNoHistory(pipeline.RoomStream("chat://n"), "e1", 10)
	h.setNoHistory(pipeline.UserStream(7), "e2", 4)
	c, _ := n.connectWith(t, "ws", claims{Mid: 7, Key: "k7", Rooms: []string{"chat://n"}, Recover: true}, nil)
	r, err := c.Recover([]wire.StreamPos{
		{Stream: "room:chat://n", Epoch: "e1", Pos: 6},
		{Stream: "user:7", Epoch: "e2", Pos: 4},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []wire.RecoverResult{
		{Stream: "room:chat://n", Reason: wire.ReasonNoHistory, Epoch: "e1", Pos: 10},
		{Stream: "user:7", Recovered: true, Epoch: "e2", Pos: 4},
	}
	if fmt.Sprint(r.Streams) != fmt.Sprint(want) {
		t.Fatalf("op 22\n got %v\nwant %v", r.Streams, want)
	}
	n.pushRoom(t, h, "chat://n", "11")
	n.pushUser(t, h, 7, "5", "k7")
	if got := readStream(t, c, 2); fmt.Sprint(got) != "[room:chat://n@11=11 user:7@5=5]" {
		t.Fatalf("live after no_history: %v", got)
	}
}

// TestRecoverProtocolErrors: a second op 21, op 21 or op 23 from a client
// that did not opt in, and op 21 after another packet ended the hold each
// close with 1002.
func TestRecoverProtocolErrors(t *testing.T) {
	n, _ := recoverNode(t, func(*config.Cloud) {})
	empty := []byte(`{"streams":[]}`)
	for i, tc := range []struct {
		name    string
		recover bool
		send    [][2]any // op, body
	}{
		{"second op 21", true, [][2]any{{wire.OpRecover, empty}, {wire.OpRecover, empty}}},
		{"op 21 after a heartbeat", true, [][2]any{{wire.OpHeartbeat, []byte(nil)}, {wire.OpRecover, empty}}},
		{"op 21 not opted in", false, [][2]any{{wire.OpRecover, empty}}},
		{"op 23 not opted in", false, [][2]any{{wire.OpAck, wire.AppendAck(nil, "e1", 1)}}},
		{"malformed op 21", true, [][2]any{{wire.OpRecover, []byte(`{"streams":[{"stream":"user:1"}]}`)}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, _ := n.connectWith(t, "ws", claims{Mid: int64(20 + i), Recover: tc.recover}, nil)
			for _, s := range tc.send {
				if _, err := c.Send(s[0].(int32), s[1].([]byte)); err != nil {
					t.Fatal(err)
				}
			}
			closedWith(t, c, closeProtocol)
		})
	}
}

// TestRecoverHoldEndedByPacket: positioned pushes to a connection that
// opted in wait for its op 21; a heartbeat instead ends the wait, as an
// op 21 naming no stream: what was held goes out from where op 8 said.
func TestRecoverHoldEndedByPacket(t *testing.T) {
	n, h := recoverNode(t, func(c *config.Cloud) { c.HandshakeTimeout = time.Minute })
	h.set(pipeline.RoomStream("live://h"), "e1", 4, 1)
	c, _ := n.connectWith(t, "tcp", claims{Mid: 12, Key: "k12", Rooms: []string{"live://h"}, Recover: true}, nil)
	n.pushRoom(t, h, "live://h", "5")
	n.pushRoom(t, h, "live://h", "6")
	ch := bucketFor(n.st.buckets, "k12").get("k12")
	held := func() int {
		ch.mu.Lock()
		defer ch.mu.Unlock()
		if ch.rec == nil {
			return -1
		}
		return len(ch.rec.held)
	}
	waitFor(t, "both pushes held", func() bool { return held() == 2 })
	if _, err := c.Send(wire.OpHeartbeat, nil); err != nil {
		t.Fatal(err)
	}
	if got := readStream(t, c, 2); fmt.Sprint(got) != "[room:live://h@5=5 room:live://h@6=6]" {
		t.Fatalf("after the hold: %v", got)
	}
	if held() != -1 {
		t.Fatal("the hold did not end")
	}
}

// TestRecoverHoldTimeout: without op 21 the hold ends at
// cloud.handshake_timeout.
func TestRecoverHoldTimeout(t *testing.T) {
	n, h := recoverNode(t, func(c *config.Cloud) { c.HandshakeTimeout = 300 * time.Millisecond })
	c, _ := n.connectWith(t, "ws", claims{Mid: 13, Key: "k13", Rooms: []string{"live://o"}, Recover: true}, nil)
	n.pushRoom(t, h, "live://o", "1")
	if got := readStream(t, c, 1); got[0] != "room:live://o@1=1" {
		t.Fatalf("after the hold's timeout: %v", got)
	}
}

// TestRecoverHoldFullCatchesUp: a room faster than a connection's
// recovery fills its hold (maxRecoverHeld live pushes); what the hold lets
// go is read from history after the rest, so the client gets every
// position once, in order, then live pushes — where it was closed with
// 4503 before, and closed again on every reconnect while the room stayed
// that fast.
func TestRecoverHoldFullCatchesUp(t *testing.T) {
	n, h := recoverNode(t, func(c *config.Cloud) { c.HandshakeTimeout = time.Minute })
	h.set(pipeline.RoomStream("live://f"), "e1", 20, 1)
	c, _ := n.connectWith(t, "ws", claims{Mid: 14, Key: "k14", Rooms: []string{"live://f"}, Recover: true}, nil)
	const live = maxRecoverHeld + 100
	for i := range live {
		n.pushRoom(t, h, "live://f", strconv.Itoa(21+i))
	}
	if _, err := c.Recover([]wire.StreamPos{{Stream: pipeline.RoomStream("live://f"), Epoch: "e1", Pos: 10}}); err != nil {
		t.Fatal(err)
	}
	n.pushRoom(t, h, "live://f", "after")
	got := readStream(t, c, 10+live+1)
	for i, m := range got[:len(got)-1] {
		if want := fmt.Sprintf("room:live://f@%d=%d", 11+i, 11+i); m != want {
			t.Fatalf("message %d: %s, want %s", i, m, want)
		}
	}
	if last, want := got[len(got)-1], fmt.Sprintf("room:live://f@%d=after", 21+live); last != want {
		t.Fatalf("live after recovery: %s, want %s", last, want)
	}
}

// TestRecoverCatchUpBounded: a recovery whose hold fills again during
// every history read it makes (the room outruns it for good) stops after
// maxRecoverCatchUps passes: the client is closed with 4503, to recover
// again from its positions, and the node holds nothing more for it.
func TestRecoverCatchUpBounded(t *testing.T) {
	rb := defaultRecoverBounds()
	rb.held = 2
	n, h := boundedRecoverNode(t, func(c *config.Cloud) { c.HandshakeTimeout = time.Minute }, rb)
	const room = "live://fast"
	h.set(pipeline.RoomStream(room), "e1", 5, 1)
	h.mu.Lock()
	h.delay = 50 * time.Millisecond // the store's latency: pushes land during each read
	h.mu.Unlock()
	c, _ := n.connectWith(t, "ws", claims{Mid: 16, Key: "k16", Rooms: []string{room}, Recover: true}, nil)
	// Three pushes (one more than the hold keeps) during each History
	// call, until the connection is closed.
	done := make(chan struct{})
	pushed := make(chan int, 1)
	go func() {
		calls := 0
		defer func() { pushed <- calls }()
		for {
			select {
			case <-done:
				return
			default:
			}
			h.mu.Lock()
			busy, before := h.inflight > 0, h.calls
			h.mu.Unlock()
			if !busy {
				runtime.Gosched()
				continue
			}
			calls++
			for range 3 {
				n.pushRoom(t, h, room, "x")
			}
			for ended := false; !ended; runtime.Gosched() {
				h.mu.Lock()
				ended = h.calls > before
				h.mu.Unlock()
			}
		}
	}()
	if _, err := c.Recover([]wire.StreamPos{{Stream: pipeline.RoomStream(room), Epoch: "e1", Pos: 3}}); err != nil {
		t.Fatal(err)
	}
	closedWith(t, c, closeRecoverAgain)
	close(done)
	if calls := <-pushed; calls < maxRecoverCatchUps {
		t.Fatalf("closed after %d history calls, want at least %d passes first", calls, maxRecoverCatchUps)
	}
}

// TestRecoverUnacked: with acks on, a connection naming no position for
// its user stream gets what follows its acknowledged position, then live.
func TestRecoverUnacked(t *testing.T) {
	n, h := recoverNode(t, func(*config.Cloud) {})
	for i := 1; i <= 30; i++ {
		n.pushUser(t, h, 15, strconv.Itoa(i))
	}
	h.mu.Lock()
	h.stream(pipeline.UserStream(15)).ackedPos = 25
	h.mu.Unlock()
	c, r := n.connectWith(t, "ws", claims{Mid: 15, Key: "k15", Recover: true, Acks: true}, nil)
	if fmt.Sprint(r.Streams) != "[{user:15 e1 25}]" {
		t.Fatalf("op 8 streams %v", r.Streams)
	}
	if _, err := c.Recover(nil); err != nil {
		t.Fatal(err)
	}
	n.pushUser(t, h, 15, "31", "k15")
	got := readStream(t, c, 6)
	if fmt.Sprint(got) != "[user:15@26=26 user:15@27=27 user:15@28=28 user:15@29=29 user:15@30=30 user:15@31=31]" {
		t.Fatalf("unacked then live: %v", got)
	}
}

// TestRecoverConcurrencyBounded: a reconnect storm never has more than
// maxRecoverCalls History calls in flight on the node.
func TestRecoverConcurrencyBounded(t *testing.T) {
	n, h := recoverNode(t, func(c *config.Cloud) { c.MaxHandshakesPerIP = 1000 })
	for i := 1; i <= 5; i++ {
		n.pushRoom(t, h, "live://storm", strconv.Itoa(i))
	}
	h.mu.Lock()
	h.delay = 20 * time.Millisecond
	h.mu.Unlock()
	const clients = 3 * maxRecoverCalls
	var wg sync.WaitGroup
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, _ := n.connectWith(t, "ws", claims{Mid: int64(100 + i), Rooms: []string{"live://storm"}, Recover: true}, nil)
			r, err := c.Recover([]wire.StreamPos{{Stream: "room:live://storm", Epoch: "e1", Pos: 0}})
			if err != nil || !r.Streams[0].Recovered {
				t.Errorf("client %d: %v, %v", i, r, err)
				return
			}
			if got := readStream(t, c, 5); got[4] != "room:live://storm@5=5" {
				t.Errorf("client %d: %v", i, got)
			}
		}()
	}
	wg.Wait()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.peak > maxRecoverCalls || h.peak < 2 {
		t.Fatalf("peak History calls in flight %d, want 2 to %d", h.peak, maxRecoverCalls)
	}
}

// TestRecoverStartBehindNode: logic reads a connection's tops before it
// joins its rooms on the node; what the node delivered in between is sent
// from history when op 21 does not name the stream, so the connection
// gets every position after the one op 8 gave, no gap.
func TestRecoverStartBehindNode(t *testing.T) {
	n, h := recoverNode(t, func(*config.Cloud) {})
	a, _ := n.connectWith(t, "ws", claims{Mid: 30, Key: "a30", Rooms: []string{"live://b"}}, nil)
	for i := 1; i <= 20; i++ {
		n.pushRoom(t, h, "live://b", strconv.Itoa(i))
	}
	readBodies(t, a, 20)
	n.logic.mu.Lock()
	n.logic.topsLag = 5
	n.logic.mu.Unlock()
	c, r := n.connectWith(t, "tcp", claims{Mid: 31, Key: "b31", Rooms: []string{"live://b"}, Recover: true}, nil)
	if fmt.Sprint(r.Streams) != "[{user:31 e1 0} {room:live://b e1 15}]" {
		t.Fatalf("op 8 streams %v", r.Streams)
	}
	if _, err := c.Recover(nil); err != nil {
		t.Fatal(err)
	}
	n.pushRoom(t, h, "live://b", "21")
	got := readStream(t, c, 6)
	if fmt.Sprint(got) != "[room:live://b@16=16 room:live://b@17=17 room:live://b@18=18 room:live://b@19=19 room:live://b@20=20 room:live://b@21=21]" {
		t.Fatalf("after op 8's start: %v", got)
	}
}

// TestRecoverLargeAtClientPace: a recovery longer than the send queue
// (cloud.send_queue 1,024 packets) is read page by page and sent at the
// client's pace, never closing it as a slow consumer.
func TestRecoverLargeAtClientPace(t *testing.T) {
	n, h := recoverNode(t, func(*config.Cloud) {})
	const missed = 3000
	h.set(pipeline.UserStream(40), "e1", missed, 1)
	c, _ := n.connectWith(t, "ws", claims{Mid: 40, Key: "k40", Recover: true}, nil)
	r, err := c.Recover([]wire.StreamPos{{Stream: "user:40", Epoch: "e1", Pos: 0}})
	if err != nil || !r.Streams[0].Recovered || r.Streams[0].Pos != missed {
		t.Fatalf("op 22 %+v, %v", r, err)
	}
	got := readStream(t, c, missed)
	if got[0] != "user:40@1=1" || got[missed-1] != fmt.Sprintf("user:40@%d=%d", missed, missed) {
		t.Fatalf("recovered %s … %s", got[0], got[missed-1])
	}
	if calls, _ := h.counts(); calls < missed/recoverPage {
		t.Fatalf("%d History calls for %d entries, want pages of %d", calls, missed, recoverPage)
	}
}
