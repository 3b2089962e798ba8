package cloud

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/pipeline/events"
	"imcloud/proto/client"
	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// ackLogic is fakeLogic with acks: its Connect says what a token's
// "recover" asks and whether acks are on, with the user's cursor, and its
// Ack keeps the cursor, counting calls, or fails as told.
type ackLogic struct {
	*fakeLogic
	acksOn bool

	mu    sync.Mutex
	calls int
	acked map[int64]uint64 // per mid
	err   error            // what Ack answers; nil: takes it
}

func (l *ackLogic) Connect(ctx context.Context, in *pb.ConnectReq, opts ...grpc.CallOption) (*pb.ConnectReply, error) {
	reply, err := l.fakeLogic.Connect(ctx, in, opts...)
	if err != nil {
		return nil, err
	}
	var tok struct {
		Recover bool `json:"recover"`
	}
	_ = json.Unmarshal(in.Token, &tok)
	reply.Recover, reply.Acks = tok.Recover, l.acksOn
	if reply.Recover && reply.Acks {
		l.mu.Lock()
		reply.Acked = &pb.StreamPos{Stream: pipeline.UserStream(reply.Mid), Epoch: "e1", Pos: l.acked[reply.Mid]}
		l.mu.Unlock()
	}
	return reply, nil
}

func (l *ackLogic) Ack(_ context.Context, in *pb.AckReq, _ ...grpc.CallOption) (*pb.AckReply, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.calls++
	if l.err != nil {
		return nil, l.err
	}
	l.acked[in.Mid] = max(l.acked[in.Mid], in.Pos)
	return &pb.AckReply{}, nil
}

func (l *ackLogic) state(mid int64) (calls int, acked uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.calls, l.acked[mid]
}

func (l *ackLogic) fail(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.err = err
}

// ackNode is a node whose logic keeps acks (acksOn) and a history h, with
// acked events collected from ev.
type ackNode struct {
	*node
	logic *ackLogic
	hist  *fakeHist
	ev    <-chan events.Event
}

func startAckNode(t *testing.T, acksOn bool) *ackNode {
	t.Helper()
	cfg := config.Default().Cloud
	// Clients here ack every message: far over the default client_rate.
	cfg.ClientRate, cfg.ClientBurst = 1e6, 1e6
	cfg.OrderGapWait = time.Hour
	hist := newFakeHist()
	logic := &ackLogic{fakeLogic: &fakeLogic{disconnects: map[string]int{}, rooms: map[string]int32{}, hist: hist},
		acksOn: acksOn, acked: map[int64]uint64{}}
	up := gochannel.NewGoChannel(gochannel.Config{OutputChannelBuffer: 64}, nil)
	evBus := gochannel.NewGoChannel(gochannel.Config{OutputChannelBuffer: 1024}, nil)
	em := events.New(events.Options{Publisher: evBus, Topic: "events", Kinds: []events.Kind{events.Acked}, Buffer: 1024, Logger: slog.New(slog.DiscardHandler)})
	msgs, err := evBus.Subscribe(context.Background(), "events")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go em.Run(ctx)
	evs := make(chan events.Event, 1024)
	go func() {
		for m := range msgs {
			var e events.Event
			if json.Unmarshal(m.Payload, &e) == nil {
				evs <- e
			}
			m.Ack()
		}
	}()
	st := New(cfg, Options{Self: &pb.NodeInfo{Id: "n1", GrpcAddr: "127.0.0.1:1"}, Logic: logic, Upstream: up, UpstreamTopic: "up",
		Logger: slog.New(slog.DiscardHandler), Events: em})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = st.ServeTCP(ln) }()
	ws := httptest.NewUnstartedServer(st.WSHandler())
	ws.Listener = st.Listener(ws.Listener)
	ws.Start()
	n := &node{st: st, rpc: &grpcServer{s: st}, logic: logic.fakeLogic, upstream: up, tcpAddr: ln.Addr().String(),
		wsURL: "ws" + strings.TrimPrefix(ws.URL, "http") + "/sub", tcpLn: ln, ws: ws}
	t.Cleanup(func() {
		_ = ln.Close()
		ws.CloseClientConnections()
		ws.Close()
		dctx, dcancel := context.WithTimeout(context.Background(), time.Second)
		defer dcancel()
		_ = st.Drain(dctx)
		cancel()
		_ = up.Close()
		_ = evBus.Close()
	})
	return &ackNode{node: n, logic: logic, hist: hist, ev: evs}
}

// connectRecover connects mid's key, opted in or not. One that opted in
// sends an op 21 naming no stream, which ends the node's hold of its
// positioned messages (the recover work), without waiting for op 22.
func (n *ackNode) connectRecover(t *testing.T, mid int64, key string, optIn bool) *client.Conn {
	t.Helper()
	c := n.dial(t, "ws", nil)
	tok, _ := json.Marshal(map[string]any{"mid": mid, "key": key, "recover": optIn})
	if _, err := c.Auth(tok); err != nil {
		t.Fatalf("auth: %v", err)
	}
	if optIn {
		body, err := wire.AppendRecoverRequest(nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Send(wire.OpRecover, body); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// readBiz reads the next want business messages' bodies, plain or
// positioned (op 20, for a connection that opted in).
func readBiz(t *testing.T, c *client.Conn, want int) []string {
	t.Helper()
	var got []string
	for len(got) < want {
		m, err := c.ReadMessage()
		if err != nil {
			t.Fatalf("read after %d messages: %v", len(got), err)
		}
		if m.Op >= wire.MinBusinessOp {
			got = append(got, string(m.Body))
		}
	}
	return got
}

// readUntil reads business messages until one with body.
func readUntil(t *testing.T, c *client.Conn, body string) {
	t.Helper()
	for {
		if got := readBiz(t, c, 1); got[0] == body {
			return
		}
	}
}

// expectClosed reads until the connection ends and checks its close code.
func expectClosed(t *testing.T, c *client.Conn, code int) {
	t.Helper()
	for {
		if _, err := c.Read(); err != nil {
			if got := client.CloseCode(err); got != code {
				t.Fatalf("closed with %d (%v), want %d", got, err, code)
			}
			return
		}
	}
}

// expectOpen checks the connection still answers a heartbeat.
func expectOpen(t *testing.T, c *client.Conn) {
	t.Helper()
	if _, err := c.Send(wire.OpHeartbeat, nil); err != nil {
		t.Fatal(err)
	}
	for {
		p, err := c.Read()
		if err != nil {
			t.Fatalf("connection ended: %v (code %d)", err, client.CloseCode(err))
		}
		if p.Op == wire.OpHeartbeatReply {
			return
		}
	}
}

// TestAcksCoalesced: a client acking each of 1,000 messages costs logic a
// call per flush interval, not one per ack; logic ends with the last
// position, and the acked event reports what logic took.
func TestAcksCoalesced(t *testing.T) {
	n := startAckNode(t, true)
	c := n.connectRecover(t, 5, "k5", true)
	const total = 1000
	// In batches the send queue holds.
	for pos := uint64(1); pos <= total; pos++ {
		n.pushKeysAt(t, 5, pos, fmt.Sprint("m", pos), fmt.Sprint(pos), "k5")
		if pos%100 == 0 {
			readBiz(t, c, 100)
		}
	}
	start := time.Now()
	for pos := uint64(1); pos <= total; pos++ {
		if err := c.Ack("e1", pos); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "logic to have position 1000", func() bool { _, acked := n.logic.state(5); return acked == total })
	calls, _ := n.logic.state(5)
	// One call per interval while acks come, one for the last batch.
	if limit := int(time.Since(start)/ackFlushEvery) + 2; calls > limit {
		t.Fatalf("%d Ack calls for %d acks in %v, want at most %d", calls, total, time.Since(start), limit)
	}
	if calls > 20 {
		t.Fatalf("%d Ack calls for %d acks", calls, total)
	}
	// Events in order of calls; the last says 1000.
	deadline := time.After(wait)
	for {
		select {
		case e := <-n.ev:
			if e.Kind != events.Acked || e.Mid != 5 || e.Key != "k5" || e.Node != "n1" || e.Position == nil || e.Position.Stream != "user:5" || e.Position.Epoch != "e1" {
				t.Fatalf("acked event %+v", e)
			}
			if e.Position.Pos == total {
				expectOpen(t, c)
				return
			}
		case <-deadline:
			t.Fatal("no acked event for position 1000")
		}
	}
}

// TestAckAbuse: what each ill-formed or ill-meant op 23 gets.
func TestAckAbuse(t *testing.T) {
	t.Run("position never sent closes 4422", func(t *testing.T) {
		n := startAckNode(t, true)
		n.hist.set("user:5", "e1", 3, 1) // 3 messages before the connection
		c := n.connectRecover(t, 5, "k5", true)
		// Those before the connection may be acked: an earlier
		// connection of the client may have had them.
		if err := c.Ack("e1", 3); err != nil {
			t.Fatal(err)
		}
		n.pushKeysAt(t, 5, 4, "m4", "4", "k5")
		readUntil(t, c, "4") // after 1 to 3, if the connection recovers them
		if err := c.Ack("e1", 4); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the ack of 4", func() bool { _, a := n.logic.state(5); return a == 4 })
		if err := c.Ack("e1", 5); err != nil {
			t.Fatal(err)
		}
		expectClosed(t, c, closeAckUnsent)
		if _, a := n.logic.state(5); a != 4 {
			t.Fatalf("logic has %d, want 4: the refused ack reached it", a)
		}
	})
	t.Run("foreign epoch dropped", func(t *testing.T) {
		n := startAckNode(t, true)
		c := n.connectRecover(t, 5, "k5", true)
		n.pushKeysAt(t, 5, 1, "m1", "1", "k5")
		readUntil(t, c, "1")
		if err := c.Ack("elsewhere", 1); err != nil {
			t.Fatal(err)
		}
		// Far past anything, but of another epoch: dropped, not 4422.
		if err := c.Ack("elsewhere", 1<<40); err != nil {
			t.Fatal(err)
		}
		expectOpen(t, c)
		if calls, _ := n.logic.state(5); calls != 0 || n.st.acker.dropped.Load() != 2 {
			t.Fatalf("%d Ack calls, %d dropped; want 0 and 2", calls, n.st.acker.dropped.Load())
		}
	})
	t.Run("not forward is a no-op", func(t *testing.T) {
		n := startAckNode(t, true)
		c := n.connectRecover(t, 5, "k5", true)
		for pos := uint64(1); pos <= 3; pos++ {
			n.pushKeysAt(t, 5, pos, fmt.Sprint("m", pos), fmt.Sprint(pos), "k5")
		}
		readBiz(t, c, 3)
		for _, pos := range []uint64{3, 2, 1, 3} {
			if err := c.Ack("e1", pos); err != nil {
				t.Fatal(err)
			}
		}
		expectOpen(t, c)
		waitFor(t, "the ack of 3", func() bool { _, a := n.logic.state(5); return a == 3 })
		if calls, _ := n.logic.state(5); calls != 1 {
			t.Fatalf("%d Ack calls, want 1", calls)
		}
	})
	t.Run("acks off ignored", func(t *testing.T) {
		n := startAckNode(t, false)
		c := n.connectRecover(t, 5, "k5", true)
		if err := c.Ack("e1", 1<<40); err != nil {
			t.Fatal(err)
		}
		expectOpen(t, c)
		if calls, _ := n.logic.state(5); calls != 0 || n.st.acker.ignored.Load() != 1 {
			t.Fatalf("%d Ack calls, %d ignored; want 0 and 1", calls, n.st.acker.ignored.Load())
		}
		// Still a protocol: a malformed body closes.
		if _, err := c.Send(wire.OpAck, []byte{5, 'e'}); err != nil {
			t.Fatal(err)
		}
		expectClosed(t, c, closeProtocol)
	})
	for _, acksOn := range []bool{true, false} {
		t.Run(fmt.Sprint("not opted in, acks ", acksOn), func(t *testing.T) {
			n := startAckNode(t, acksOn)
			c := n.connectRecover(t, 5, "k5", false)
			n.pushKeysAt(t, 5, 1, "m1", "1", "k5")
			readUntil(t, c, "1")
			if err := c.Ack("e1", 1); err != nil {
				t.Fatal(err)
			}
			expectClosed(t, c, closeProtocol)
		})
	}
	for _, body := range [][]byte{nil, {0}, wire.AppendAck(nil, "e1", 0), wire.AppendAck(nil, "e1", 1)[:5], append(wire.AppendAck(nil, "e1", 1), 0)} {
		t.Run(fmt.Sprintf("malformed %x", body), func(t *testing.T) {
			n := startAckNode(t, true)
			c := n.connectRecover(t, 5, "k5", true)
			if _, err := c.Send(wire.OpAck, body); err != nil {
				t.Fatal(err)
			}
			expectClosed(t, c, closeProtocol)
		})
	}
}

// TestAckLogicAnswers: what the node does with each answer of logic's Ack.
func TestAckLogicAnswers(t *testing.T) {
	t.Run("out of range closes 4422", func(t *testing.T) {
		n := startAckNode(t, true)
		c := n.connectRecover(t, 5, "k5", true)
		n.pushKeysAt(t, 5, 1, "m1", "1", "k5")
		readUntil(t, c, "1")
		n.logic.fail(status.Error(codes.OutOfRange, "past the top"))
		if err := c.Ack("e1", 1); err != nil {
			t.Fatal(err)
		}
		expectClosed(t, c, closeAckUnsent)
	})
	t.Run("epoch changed dropped", func(t *testing.T) {
		n := startAckNode(t, true)
		c := n.connectRecover(t, 5, "k5", true)
		n.pushKeysAt(t, 5, 1, "m1", "1", "k5")
		readUntil(t, c, "1")
		n.logic.fail(status.Error(codes.FailedPrecondition, "epoch"))
		if err := c.Ack("e1", 1); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the failure counted", func() bool { return n.st.AckFailures() == 1 })
		expectOpen(t, c)
		if calls, _ := n.logic.state(5); calls != 1 {
			t.Fatalf("%d Ack calls, want 1 (no retry)", calls)
		}
	})
	t.Run("unavailable retried, then given up", func(t *testing.T) {
		n := startAckNode(t, true)
		c := n.connectRecover(t, 5, "k5", true)
		n.pushKeysAt(t, 5, 1, "m1", "1", "k5")
		readUntil(t, c, "1")
		n.logic.fail(status.Error(codes.Unavailable, "down"))
		if err := c.Ack("e1", 1); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the tries", func() bool { return n.st.AckFailures() == ackTries })
		expectOpen(t, c)
		if calls, _ := n.logic.state(5); calls != ackTries {
			t.Fatalf("%d Ack calls, want %d", calls, ackTries)
		}
		// Back up: the client's next ack goes through.
		n.logic.fail(nil)
		n.pushKeysAt(t, 5, 2, "m2", "2", "k5")
		readUntil(t, c, "2")
		if err := c.Ack("e1", 2); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the ack of 2", func() bool { _, a := n.logic.state(5); return a == 2 })
	})
}

// TestAcksOfManyUsers: every user's ack reaches logic, one call
// each, however many users ack at once.
func TestAcksOfManyUsers(t *testing.T) {
	n := startAckNode(t, true)
	const users = 50
	conns := make([]*client.Conn, users)
	for i := range conns {
		mid := int64(100 + i)
		conns[i] = n.connectRecover(t, mid, fmt.Sprint("k", mid), true)
		n.pushKeysAt(t, mid, 1, fmt.Sprint("m", mid), "1", fmt.Sprint("k", mid))
	}
	for _, c := range conns {
		readUntil(t, c, "1")
		for range 10 {
			if err := c.Ack("e1", 1); err != nil {
				t.Fatal(err)
			}
		}
	}
	waitFor(t, "every user's ack", func() bool {
		for i := range users {
			if _, a := n.logic.state(int64(100 + i)); a != 1 {
				return false
			}
		}
		return true
	})
	if calls, _ := n.logic.state(0); calls != users {
		t.Fatalf("%d Ack calls for %d users acking 10 times each, want %d", calls, users, users)
	}
}

// TestAcksFlushedOnDrain: an ack a client sent just before the node
// drains reaches logic before Drain returns, not a flush interval later
// (when the process may be gone).
func TestAcksFlushedOnDrain(t *testing.T) {
	n := startAckNode(t, true)
	c := n.connectRecover(t, 5, "k5", true)
	n.pushKeysAt(t, 5, 1, "m1", "1", "k5")
	readUntil(t, c, "1")
	if err := c.Ack("e1", 1); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the ack queued", func() bool {
		n.st.acker.mu.Lock()
		defer n.st.acker.mu.Unlock()
		return len(n.st.acker.pending) == 1
	})
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := n.st.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	if calls, acked := n.logic.state(5); calls != 1 || acked != 1 {
		t.Fatalf("after Drain logic had %d calls, position %d; want 1 and 1", calls, acked)
	}
}
